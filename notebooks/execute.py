"""Execute notebooks in place in real mode (the embedded model; the outputs that are committed).

python notebooks/execute.py                       # all notebooks
python notebooks/execute.py 01_quickstart.ipynb   # some
"""

import argparse
from pathlib import Path

import nbclient
import nbformat

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebook file names in this folder (default: all)")
    names = parser.parse_args().notebooks or sorted(p.name for p in HERE.glob("*.ipynb"))
    missing = [name for name in names if not (HERE / name).is_file()]
    if missing:
        parser.error(f"no notebook {', '.join(missing)} in {HERE}")
    for name in names:
        path = HERE / name
        notebook = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(
            notebook, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
        ).execute()
        nbformat.write(notebook, path)
        print(f"executed {name}")


if __name__ == "__main__":
    main()
