"""The offline default corpus: English text every Python installation already carries.

With `data.source = "default"` nopejax trains on documentation that ships with CPython, so a
first run needs no download and no data preparation:

  1. `pydoc_data.topics`: the language reference topics behind `help("if")` etc.
     (CPython 3.11: 79 documents, 0.47 MB);
  2. the docstrings of the pure-Python standard library: for every `.py` file under the
     stdlib directory (tests, site-packages and caches excluded), one document holding the
     module's docstring and those of its classes, functions and methods in source order,
     each under a `class Name` / `def name(args)` header. Read with `ast`, never imported,
     so gathering has no side effects (CPython 3.11: 643 documents, 2.09 MB).

In total (CPython 3.11.7) 722 documents, 2.56 MB of UTF-8 text = 2.56 M byte-tokenizer tokens
(2.56 M + 1444 BOS/EOS); other versions differ slightly. Small, but real English prose about
code, enough to watch a small decoder learn within minutes on a CPU. The 2% eval split is 20
documents (67 K tokens).

Deterministic: files are walked in sorted order and nothing depends on the environment but
the Python installation, so the same Python yields the same documents in the same order.
Gathered once (2-4 s) and cached as JSONL under `$NOPEJAX_CACHE` (default
`~/.cache/nopejax`); the cache name carries the Python version and a corpus version.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import warnings

try:
    from pydoc_data.topics import topics as _TOPICS
except ImportError:  # some distributions package pydoc_data separately
    _TOPICS = {}

CORPUS_VERSION = 1
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def cache_dir() -> str:
    return os.environ.get("NOPEJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nopejax")


def default_corpus_path() -> str:
    """Path of the cached corpus JSONL (field "text"), gathering it on first use."""
    key = hashlib.sha256(f"{CORPUS_VERSION}|{sys.version}|{sysconfig.get_paths()['stdlib']}".encode()).hexdigest()
    name = f"default_corpus-py{sys.version_info[0]}{sys.version_info[1]}-{key[:12]}.jsonl"
    path = os.path.join(cache_dir(), name)
    if not os.path.isfile(path):
        os.makedirs(cache_dir(), exist_ok=True)
        # Concurrent first runs (several processes on one machine) each write a private file
        # and rename it into place; the rename is atomic and every writer's content is equal.
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in gather_documents():
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return path


def gather_documents() -> list[str]:
    """All documents of the corpus, in their fixed order."""
    docs = []
    docs += [_TOPICS[k].strip() for k in sorted(_TOPICS) if _TOPICS[k].strip()]

    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                text = _module_docstrings(path, module)
                if text:
                    docs.append(text)
    return docs


def _module_docstrings(path: str, module: str) -> str:
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old escapes in stdlib sources warn on parse
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, OSError):
        return ""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)
    _walk(tree.body, "", parts)
    return f"Module {module}\n\n" + "\n\n".join(parts) if parts else ""


def _walk(body: list[ast.stmt], prefix: str, parts: list[str]) -> None:
    for node in body:
        if isinstance(node, ast.ClassDef):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(f"class {prefix}{node.name}\n{doc}")
            _walk(node.body, f"{prefix}{node.name}.", parts)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(f"def {prefix}{node.name}({ast.unparse(node.args)})\n{doc}")
