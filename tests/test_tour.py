"""The notebook tour (tour.ipynb) runs from the committed checkpoints as committed: executed here cell by cell in a
fresh kernel, at the repository's root, every cell without an error and with the outputs the committed file shows."""
import nbformat
import pytest

from conftest import ROOT

nbclient = pytest.importorskip("nbclient", reason="the tour's runner: pip install -r requirements.txt")


def test_the_tour_runs_from_the_committed_checkpoints_and_reads_on_the_web_as_committed():
    path = ROOT / "tour.ipynb"
    assert path.stat().st_size < 1_000_000  # it shows on the repository's page with its pictures
    committed = nbformat.read(path, as_version=4)
    executed = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(executed, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()  # raises on a failing cell
    code = [(ours, theirs) for ours, theirs in zip(executed.cells, committed.cells) if ours.cell_type == "code"]
    assert len(code) >= 7
    for ours, theirs in code:
        assert kinds(ours) and kinds(ours) == kinds(theirs)
    pictures = [output for _, cell in code for output in cell.outputs if "image/png" in output.get("data", {})]
    assert len(pictures) >= 6  # samples, reconstructions, posterior draws, the line, the ten digits
    printed = "".join(output.get("text", "") for ours, _ in code for output in ours.outputs)
    bounds = [float(line.split("<= ")[1].split()[0]) for line in printed.splitlines() if line.startswith("K =")]
    assert len(bounds) == 3 and bounds[0] > bounds[1] > bounds[2]  # the IWAE bound tightens with K


def kinds(cell):
    """What a cell shows, in order: ("stream", []) for printed text (however the kernel split it into
    writes), ("display_data", ["image/png", "text/plain"]) for a picture, ..."""
    shown = [(output.output_type, sorted(output.get("data", {}))) for output in cell.outputs]
    return [kind for k, kind in enumerate(shown) if k == 0 or kind != ("stream", []) or shown[k - 1] != kind]
