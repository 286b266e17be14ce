"""`nopejax` command line: argument parsing only; the work happens in the modules it calls.

User mistakes (a bad config, a missing file) print one line saying what is wrong and how to
fix it, and exit 2 without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _config(args) -> object:
    from nopejax import config, validation

    cfg = config.load_config(args.config) if args.config else _workdir_config(args) or config.base_config()
    return validation.validate(config.apply_overrides(cfg, args.overrides))


def _workdir_config(args):
    """Without --config, a workdir's newest checkpoint (an imported or earlier run) gives the config."""
    from nopejax import checkpoint
    from nopejax.config import ConfigError

    workdir = getattr(args, "workdir", None)
    if not workdir or not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    try:
        return checkpoint.read_config(*checkpoint.find_checkpoint(workdir))
    except ConfigError:  # no complete checkpoint yet: a new run
        return None


def cmd_train(args) -> int:
    from nopejax import distributed, train

    distributed.maybe_initialize(args)
    cfg = _config(args)
    if args.workdir and os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise _usage(f"--workdir {args.workdir!r} is a file; give a directory (new, or a run's to resume)")
    if args.dry_run:
        report = train.dry_run(cfg, args.topology)
        mem = report["memory_per_device_gib"]
        print(f"compiled for {report['devices']} x {report['device_kind']} (mesh {report['mesh']}) "
              f"in {report['compile_seconds']} s")  # fmt: skip
        print(f"params {report['param_count'] / 1e6:,.1f} M; memory per device {mem} GiB; "
              f"{report['flops_per_device'] / 1e12:,.2f} TFLOP per device per step")  # fmt: skip
        print(json.dumps({k: report[k] for k in ("compile_seconds", "param_count", "memory_per_device_gib",
                                                  "flops_per_device")}))  # fmt: skip
        return 0
    if not args.workdir:
        raise _usage("train needs --workdir DIR (where config, metrics and checkpoints go)")
    summary = train.run(cfg, args.workdir, progress=not args.no_progress)
    import jax

    done = f"stopped by {summary['stopped_by']} at" if summary["preempted"] else "finished"
    if jax.process_index() > 0:  # one line each, so every process's stop step can be checked
        print(f"process {jax.process_index()}: {done} step {summary['steps']}")
    else:
        if summary["steps"] > summary["start"]:  # else train.run said there was nothing to do
            evaluated = summary["eval_loss"] is not None
            at = f" (step {summary['eval_step']})" if evaluated and summary["eval_step"] != summary["steps"] else ""
            print(f"\n{done} step {summary['steps']} in {summary['seconds']} s: loss {summary['final_loss']:.4f}"
                  + (f", eval loss {summary['eval_loss']:.4f}{at}" if evaluated else ""))  # fmt: skip
        print(f"checkpoints {summary['checkpoints']} in {os.path.join(args.workdir, 'checkpoints')}; "
              f"metrics in {os.path.join(args.workdir, 'metrics.jsonl')}; "
              f"tensorboard --logdir {os.path.join(args.workdir, 'tensorboard')}")  # fmt: skip
    return 130 if summary["stopped_by"] == "SIGINT" else 0  # the shell's code for an interrupted command


def _refuse_overrides(args, used: tuple[str, ...] = ()) -> list[str]:
    """The --config.* overrides a command reads from the checkpoint's config; any other is refused, not ignored."""
    unused = [o for o in args.overrides if o.split("=", 1)[0].removeprefix("--config.") not in used]
    if unused:
        takes = f"only --config.{used[0]}=..." if used else "no --config.* overrides"
        raise _usage(f"{args.command} takes {takes}: the model, data and tokenizer are the checkpoint's own; "
                     f"got {unused[0]}")  # fmt: skip
    return args.overrides


def cmd_export(args) -> int:
    from nopejax import checkpoint, config, data, hf, validation

    overrides = _refuse_overrides(args, used=("model.hf_family",))  # another family that can hold the model
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise _usage(f"--out {args.out!r} is a file; export writes a directory of files, so give a directory path")
    root, step = checkpoint.find_checkpoint(args.workdir, args.step)
    cfg = config.apply_overrides(checkpoint.read_config(root, step), overrides)
    validation.validate(cfg)
    hf.check_exportable(cfg.model)  # before the params are read
    params = checkpoint.restore_params(root, step)
    tokenizer = data.make_tokenizer(cfg.data)  # written beside the weights, so AutoTokenizer loads it
    hf.to_hf(params, args.out, cfg.model, dtype=args.dtype, tokenizer=tokenizer, add_bos=cfg.data.add_bos)
    print(f"wrote {args.out} from {root} step {step}: load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({args.out!r})")  # fmt: skip
    return 0


def cmd_import_hf(args) -> int:
    from nopejax import checkpoint, config, data, hf, train, validation

    with open(os.path.join(args.hf_dir, "config.json")) as f:
        m = hf.model_config_from_hf(json.load(f))
    cfg = config.load_config(args.config) if args.config else config.base_config()
    cfg.model = m
    cfg.data.tokenizer = data.tokenizer_from_hf(args.hf_dir, args.workdir) or cfg.data.tokenizer
    cfg = validation.validate(config.apply_overrides(cfg, args.overrides))
    s = train.setup(cfg)
    params = hf.load_params(args.hf_dir, cfg.model)
    import jax

    params = jax.tree.map(lambda x, sh: jax.device_put(x, sh), params, s.state_shardings["params"])
    state = train.fresh_opt_state(s, params)
    checkpoint.write_run_config(args.workdir, cfg)
    ckpt = checkpoint.Checkpointer(args.workdir, cfg)
    ckpt.save(0, state, None, force=True)
    ckpt.close()
    print(f"wrote step-0 checkpoint of {args.hf_dir} to {args.workdir}/checkpoints; "
          f"continue with: nopejax train --workdir {args.workdir} (the imported config; override fields "
          f"with --config.KEY=VALUE), or start a new run from it with --config.init_from={args.workdir}")  # fmt: skip
    return 0


def cmd_generate(args) -> int:
    import jax

    from nopejax import checkpoint, data, hf
    from nopejax.decode import check_sampling, encode_prompt, generate

    _refuse_overrides(args)
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)  # before loading
    root, step = checkpoint.find_checkpoint(args.workdir, args.step)
    cfg = checkpoint.read_config(root, step)
    if cfg.model.mamba_impl == "pallas" and jax.default_backend() != "tpu":
        cfg.model.mamba_impl = "xla"  # the same SSD; its Pallas kernel compiles for TPU only
    if cfg.model.gdn_impl == "pallas" and jax.default_backend() != "tpu":
        cfg.model.gdn_impl = "xla"  # the same rule; its Pallas kernels compile for TPU only
    tok = data.make_tokenizer(cfg.data)
    module = hf.build(cfg.model, checkpoint.restore_params(root, step))
    prompt_ids = encode_prompt(tok, args.prompt, cfg.data.add_bos)
    ids = generate(module, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                   eos_id=tok.eos_id)  # fmt: skip
    completion = tok.decode(ids)
    print(completion)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": completion, "prompt_ids": prompt_ids.tolist(),
                          "completion_ids": ids.tolist()}))  # fmt: skip
    return 0


def cmd_eval_length(args) -> int:
    from nopejax.eval import command

    return command.main(args)


class _UsageError(Exception):
    pass


def _usage(message: str) -> _UsageError:
    return _UsageError(message)


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--config",
        required=required,
        help="a config file defining get_config() (e.g. configs/tiny.py), or a run's config.json",
    )


def build_parser() -> argparse.ArgumentParser:
    from nopejax.hf import registry as hf_registry  # the family list, for the help of import-hf and export

    hf_labels = hf_registry.labels()
    parser = argparse.ArgumentParser(prog="nopejax", description="Pretrain decoder LMs that mix RoPE and NoPE layers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train, resuming from the workdir's newest checkpoint",
                       epilog="Override any config field with --config.SECTION.KEY=VALUE, "
                              "e.g. --config.train.steps=100 --config.model.no_rope_layer_interval=0")  # fmt: skip
    _add_config_args(p)
    p.add_argument("--workdir", help="directory for config.json, metrics.jsonl, tensorboard/, checkpoints/")
    p.add_argument("--dry-run", action="store_true", help="compile the step, print memory and FLOPs, do not train")
    p.add_argument("--topology", help="with --dry-run: compile ahead of time for a TPU slice, e.g. v5p:2x2x4")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--coordinator", help="multi-process: coordinator host:port (or NOPEJAX_COORDINATOR)")
    p.add_argument("--num-processes", type=int, help="multi-process: process count (or NOPEJAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="multi-process: this process's id (or NOPEJAX_PROCESS_ID)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a HuggingFace checkpoint of the run's model.hf_family",
                       epilog=f"--config.model.hf_family=FAMILY (one of {', '.join(hf_registry.NAMES)}) writes another "
                              "family that holds the same model (refused, with the reason, where it cannot); no other "
                              "--config.* applies")  # fmt: skip
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--out", required=True, help="output directory (config.json, safetensors, tokenizer files)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="tensor dtype (default: the param dtype)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-hf", help=f"write a step-0 checkpoint from a HuggingFace checkpoint ({hf_labels})")
    p.add_argument("hf_dir")
    p.add_argument("--workdir", required=True)
    _add_config_args(p)
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("generate", help="continue a prompt with a run's checkpoint (KV cache; greedy by default)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--prompt", required=True, help="text to continue (BOS is prepended when the run adds one)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="stop after this many tokens (or at EOS)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--json", action="store_true", help="last line: {prompt, completion, prompt_ids, completion_ids}")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval-length", help="loss by position, past the training length",
                       epilog="Runs on the run's mesh; change it with --config.mesh.KEY=VALUE, "
                              "e.g. --config.mesh.fsdp=8 --config.mesh.data=1")  # fmt: skip
    p.add_argument("--workdir", required=True)
    p.add_argument("--lengths", default="128,256,512,1024", help="comma-separated sequence lengths")
    p.add_argument("--step", type=int)
    p.add_argument("--compare", nargs="*", default=[], help="more workdirs to plot alongside")
    p.add_argument("--bucket", type=int, default=0, help="position bucket size (default: the training length)")
    p.add_argument("--batches", type=int, default=4, help="batches of held-out data per length")
    p.add_argument("--rope-scaling", help='e.g. \'{"rope_type": "yarn", "factor": 4}\' (RoPE layers only)')
    p.set_defaults(func=cmd_eval_length)

    # listed for --help; `main` hands their arguments to nopejax.data unparsed
    p = sub.add_parser("data", help="`nopejax data prepare --config ... --out DIR`: tokenize once into shards")
    p.add_argument("action", choices=["prepare"])
    p = sub.add_parser("tokenizer", help="`nopejax tokenizer train --input GLOB --vocab-size N --out DIR`")
    p.add_argument("action", choices=["train"])
    return parser


def _delegate(name: str, rest: list[str]) -> int:
    from nopejax import data

    return getattr(data, name)(rest)


def main(argv: list[str] | None = None) -> int:
    from nopejax import quiet
    from nopejax.config import ConfigError, RunError

    argv = list(sys.argv[1:] if argv is None else argv)
    quiet.setup()  # no TPU-runtime probing without a TPU, no orbax read-only chatter
    if argv[:2] == ["data", "prepare"]:  # these parse their own arguments, overrides included
        return _delegate("prepare_main", argv[2:])
    if argv[:1] == ["tokenizer"]:
        return _delegate("tokenizer_main", argv[1:])
    # --config.KEY=VALUE overrides are ours, not argparse's
    for i, a in enumerate(argv):
        if a.startswith("--config.") and "=" not in a:  # `--config.train.steps 5`: say how to write it
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else "VALUE"
            problem = ConfigError(
                a.removeprefix("--config."), "an override needs the form KEY=VALUE", f"write {a}={value}"
            )
            print(f"nopejax {argv[0]}: error: {problem}", file=sys.stderr)
            return 2
    overrides = [a for a in argv if a.startswith("--config.")]
    argv = [a for a in argv if not a.startswith("--config.")]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.overrides = overrides
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (ConfigError, _UsageError, FileNotFoundError) as e:
        print(f"nopejax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:  # not a user mistake, but still one line: what happened, what to do
        print(f"nopejax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training started (or outside it): nothing to save
        print(f"nopejax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
