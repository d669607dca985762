"""Execute notebooks in place in real mode (the embedded model; the outputs that are committed).

python notebooks/execute.py                       # all notebooks
python notebooks/execute.py 01_quickstart.ipynb   # some
"""

import sys
from pathlib import Path

import nbclient
import nbformat

HERE = Path(__file__).resolve().parent


def main() -> None:
    names = sys.argv[1:] or sorted(p.name for p in HERE.glob("*.ipynb"))
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
