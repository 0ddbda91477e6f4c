"""Push a saved adapter (adapter files only) to the Hub with a rendered model card.

    python scripts/push_adapter.py runs/sst2/adapter --repo_id me/roberta-base-lora-sst2 [--results FILE]
        [--private] [--license apache-2.0] [--dry_run]

``--dry_run`` validates the folder, writes README.md into it and prints the exact file list and sizes;
nothing touches the network. The token comes from `huggingface-cli login` or HF_TOKEN. The card's "Serving"
table says where the adapter runs as saved (``python -m hf_lorax.export --check DIR`` exits 1 when an engine would
not serve it exactly). Errors are one line on stderr, exit code 2.
"""

from __future__ import annotations

__hf_lorax_command__ = True  # an hf_lorax command: third-party import messages held back (hf_lorax.cli)

import sys

from hf_lorax.cli import OneLineArgumentParser, debug_enabled
from hf_lorax.hub import push_adapter


def main(argv=None) -> int:
    check = "before pushing, run python -m hf_lorax.export --check ADAPTER_DIR (exit 1: not servable as saved)"
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   removed={"--serving_engines": check, "--force": check})
    parser.add_argument("adapter_dir")
    parser.add_argument("--repo_id", required=True)
    parser.add_argument("--results", help="results.json to publish (default: the folder's own, if any)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--license")
    parser.add_argument("--commit_message")
    parser.add_argument("--revision")
    parser.add_argument("--dry_run", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    try:
        plan = push_adapter(args.adapter_dir, args.repo_id, results=args.results, private=args.private or None,
                            license=args.license, commit_message=args.commit_message, revision=args.revision,
                            dry_run=args.dry_run)
    except (ValueError, FileNotFoundError) as exc:
        if args.debug or debug_enabled():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(plan.describe())
    print(f"model card: {args.adapter_dir.rstrip('/')}/README.md")
    print("dry run: nothing uploaded" if args.dry_run else f"uploaded: {plan.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
