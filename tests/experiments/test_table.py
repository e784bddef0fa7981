"""``python -m experiments.table --quick``: the whole pipeline of reft commands, from the warm-up to
TABLE.md. Every command starts its own Ray and vLLM engines (about a minute each on 2 cores), so
the test runs two of the six algorithms, one of each kind of final model (sft: an SFT epoch
``rl/epoch-N``; reft: an RL checkpoint's ``policy``): ~8 minutes on 2 cores. All six are the
same two code paths; the full table is ``python -m experiments.table`` (README)."""
import pandas as pd
import pytest

from experiments.table import main


@pytest.mark.slow
def test_quick_table_has_every_algorithm_and_every_column(tmp_path):
    assert main(["--quick", "--out", str(tmp_path), "--algorithms", "sft,reft"]) == 0

    table4 = pd.read_csv(tmp_path / "report" / "table4.csv")
    assert list(table4["algorithm"]) == ["SFT continued", "ReFT"]
    assert {"top-1", "voting@K", "reranking@K"} <= set(table4.columns)
    assert table4[["top-1", "voting@K", "reranking@K"]].notna().all().all()
    assert (table4["K"] == 4).all()

    text = (tmp_path / "TABLE.md").read_text()
    assert "commit:" in text and "| **total** |" in text
    assert (tmp_path / "report" / "voting.png").is_file() and (tmp_path / "report" / "epochs.png").is_file()
