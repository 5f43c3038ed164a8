"""The shared bench row: identity keys first, figures after, params copied, bad identities and clashing figures
refused."""

import pytest

from diffexit.app.bench.rows import COMMON_KEYS, RowId, bench_row


def test_a_row_carries_its_identity_then_its_figures():
    params = {"stat": "min", "schedule": {"kind": "cosine"}}
    row = bench_row(RowId("sched-cosine-min", "sched (min)", params), task="pick", nfe=3.5)
    assert list(row) == [*COMMON_KEYS, "task", "nfe"]
    assert row == {"method": "sched-cosine-min", "family": "sched (min)", "params": params, "task": "pick",
                   "nfe": 3.5}
    # Each row gets its own params: a bench that edits one row's params leaves the identity and other rows alone.
    row["params"]["cache"] = "prefix"
    assert "cache" not in params
    assert bench_row(RowId("full", "full"))["params"] == {}


@pytest.mark.parametrize("name, family, params, message", [
    ("", "sched", {}, "name must be a non-empty string"),
    ("full", None, {}, "family must be a non-empty string"),
    ("full", "full", [("steps", 16)], "params must be a dict"),
])
def test_a_bad_identity_is_refused(name, family, params, message):
    with pytest.raises(ValueError, match=message):
        RowId(name, family, params)


def test_a_figure_named_like_an_identity_key_is_refused():
    with pytest.raises(ValueError, match=r"\['family'\] would overwrite the row's identity"):
        bench_row(RowId("full", "full"), family="other", nfe=1.0)
