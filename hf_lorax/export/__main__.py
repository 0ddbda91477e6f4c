"""Export an adapter for a serving engine, or check how one would serve it.

    python -m hf_lorax.export SRC DST --engine vllm [--rank N]
    python -m hf_lorax.export SRC DST --merge [--engine vllm]
    python -m hf_lorax.export --check SRC [--engine vllm]

``--check`` prints, per engine (all four without ``--engine``), what the engine would refuse or silently change,
and exits 1 when the adapter cannot be served exactly as saved. Errors are one line on stderr, exit code 2.
"""

from __future__ import annotations

import sys

from ..cli import OneLineArgumentParser, debug_enabled
from ..serving import ENGINES, check_serving
from . import export_adapter


def main(argv=None) -> int:
    parser = OneLineArgumentParser(prog="python -m hf_lorax.export", description=__doc__.split("\n\n")[0], removed={
        "--dora": "use --merge (the exact merged model, DoRA included)", "--heads": "use --merge (it holds the heads)"})
    parser.add_argument("src", help="a saved adapter folder")
    parser.add_argument("dst", nargs="?", help="a new folder for the exported adapter (not with --check)")
    parser.add_argument("--engine", choices=sorted(ENGINES), help="vllm, tgi, lorax or peft (optional with --merge)")
    parser.add_argument("--check", action="store_true", help="only report how the engine would serve SRC")
    parser.add_argument("--rank", type=int, help="pad every module to this rank")
    parser.add_argument("--merge", action="store_true",
                        help="write the merged full model (any adapter, DoRA and task heads included; exact)")
    parser.add_argument("--base_model", help="base model folder for --merge (default: the adapter's)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        if args.check:
            if args.dst or args.merge or args.rank is not None or args.base_model:
                raise ValueError("--check takes one folder (SRC) and --engine; drop DST, --merge, --rank and "
                                 "--base_model.")
            reports = [check_serving(args.src, e) for e in ([args.engine] if args.engine else ENGINES)]
            print("\n".join(str(r) for r in reports))
            return 0 if all(r.servable_as_is for r in reports) else 1
        if not args.dst or not (args.engine or args.merge):
            raise ValueError("pass SRC DST --engine ENGINE, SRC DST --merge, or --check SRC.")
        result = export_adapter(args.src, args.dst, args.engine or "peft", rank=args.rank, merge=args.merge,
                                base_model=args.base_model)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        if args.debug or debug_enabled():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
