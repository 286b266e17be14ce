"""`nopejax eval-length`'s public names, kept importable for one release: the code lives in nopejax.eval."""

from nopejax.eval.command import FILES, OUT_DIR, evaluate, main, parse_lengths
from nopejax.eval.loss_by_length import TextResult, bucket_bounds, eval_text, text_windows
from nopejax.eval.output import write_csv
from nopejax.eval.passkey import PASSKEY_DEPTHS, PasskeyResult, eval_passkey, passkey_batch
from nopejax.eval.stats import FORWARD_TOKENS, Stats, eval_config, mesh_config, parse_rope_scaling, read_run, stats_fn
from nopejax.eval.tasks import TaskResult, eval_task, task_batch

__all__ = [
    "FILES", "FORWARD_TOKENS", "OUT_DIR", "PASSKEY_DEPTHS", "PasskeyResult", "Stats", "TaskResult", "TextResult",
    "bucket_bounds", "eval_config", "eval_passkey", "eval_task", "eval_text", "evaluate", "main", "mesh_config",
    "parse_lengths", "parse_rope_scaling", "passkey_batch", "read_run", "stats_fn", "task_batch", "text_windows",
    "write_csv",
]  # fmt: skip
