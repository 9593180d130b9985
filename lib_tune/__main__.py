"""Command line: `python -m lib_tune demo [--out DIR] [--steps N]` (see lib_tune/demo.py)."""
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m lib_tune demo [--out DIR] [--steps N] [--seed N]\n\n"
              "  demo  train a LoRA on a tiny built-in model with synthetic images (CPU, no download) and write\n"
              "        the adapter, a before/after image and the loss curve")
        return 0 if argv else 2
    if argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    print(f"unknown command {argv[0]!r}; try: python -m lib_tune demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
