"""Command line: `python -m lib_tune demo [--out DIR] [--steps N]` (see lib_tune/demo.py)."""
import importlib.util
import sys

#: what the demo needs beyond the standard library; a python without them gets told which one to use
NEEDED = ("torch", "ldm")
MISSING = ("the demo needs {missing}, which this python ({python}) does not have; in a checkout, run it with the "
            "environment dev/install.sh builds: .venv/bin/python -m lib_tune demo")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m lib_tune demo [--out DIR] [--steps N] [--seed N]\n\n"
              "  demo  train a LoRA on a tiny built-in model with synthetic images (CPU, no download) and write\n"
              "        the adapter, a before/after image and the loss curve\n"
              "  tools resize|merge ...  adapter tools (python -m lib_tune tools -h)")
        return 0 if argv else 2
    if argv[0] == "demo":
        missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
        if missing:
            print(MISSING.format(missing=" and ".join(missing), python=sys.executable), file=sys.stderr)
            return 2
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv[0] == "tools":  # adapter tools (lib_tune/tools/cli.py): resize, merge
        from .tools.cli import main as tools_main

        return tools_main(argv[1:])
    print(f"unknown command {argv[0]!r}; try: python -m lib_tune demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
