"""`metazo compare`: equal forward-pass budgets, the table files, and its bad inputs."""

import json

import pytest

from metazo.cli import main
from metazo.compare import parse_contender
from metazo.errors import MetazoError

RUN = ["--model", "tiny-llama", "--eval-examples", "16", "--no-progress"]


def test_compare_writes_tables_and_plot_at_equal_budgets(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", *RUN, "--sampler", "gaussian", "--sampler", "rademacher:lr=1e-4,eps=2e-3",
                 "--budget", "6", "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["sampler"] for r in rows] == ["gaussian", "rademacher:lr=1e-4,eps=2e-3"]
    assert all(r["forward_passes"] == 6 and r["steps"] == 3 for r in rows)
    assert rows[1]["lr"] == 1e-4 and rows[1]["eps"] == 2e-3
    assert len(rows[0]["history"]) == 3 and rows[0]["history"][-1][0] == 6
    table = (out / "compare.md").read_text()
    assert "| gaussian | full |" in table and table in captured.out
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_contender_specs():
    c = parse_contender("rademacher:lr=1e-4,eps=0.01,lora_rank=4")
    assert c.sampler == "rademacher" and c.overrides == {"lr": 1e-4, "eps": 0.01, "lora_rank": 4}
    with pytest.raises(MetazoError, match="unknown sampler 'nope'"):
        parse_contender("nope")
    with pytest.raises(MetazoError, match="not key=value"):
        parse_contender("gaussian:lr")


@pytest.mark.parametrize("extra,fragment", [(["--budget", "0"], "budget"), (["--budget", "1"], "less than one step"),
                                            (["--sampler", "nope"], "unknown sampler")])
def test_compare_bad_input_is_one_line(tmp_path, capsys, extra, fragment):
    out = tmp_path / "cmp"
    code = main(["compare", *RUN, "--output", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and fragment in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
