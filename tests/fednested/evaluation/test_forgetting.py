"""forgetting_report against a loss matrix computed by hand."""

import pytest

from fednested.evaluation.forgetting import forgetting_report

# Oldest champion c0, later champion c1, parent p (never a champion; not scored on b), candidate cand.
LOSSES = {
    "c0": {"a": 2.0, "b": 3.0},
    "c1": {"a": 1.5, "b": 3.2},
    "p": {"a": 1.4},
    "cand": {"a": 1.6, "b": 3.1, "c": 1.0},
}
VERSIONS = ["c0", "c1", "p", "cand"]


def test_figures_match_the_hand_computed_matrix() -> None:
    report = forgetting_report(VERSIONS, LOSSES, parent="p", champions=["c0", "c1"])
    a, b, c = (report.domain(name) for name in "abc")
    assert a is not None
    assert b is not None
    assert c is not None
    # a: best earlier is the parent's 1.4, first scored was c0's 2.0.
    assert a.vs_parent is not None
    assert a.vs_parent.change == pytest.approx(0.2)
    assert a.vs_parent.relative_change == pytest.approx(0.2 / 1.4)
    assert [(item.version_id, round(item.change, 9)) for item in a.vs_champions] == [("c0", -0.4), ("c1", 0.1)]
    assert a.forgetting == pytest.approx(0.2)
    assert a.backward_transfer == pytest.approx(0.4)
    # b: the parent never saw it; best earlier is c0's 3.0, which is also the first.
    assert b.vs_parent is None
    assert b.forgetting == pytest.approx(0.1)
    assert b.backward_transfer == pytest.approx(-0.1)
    # c: new with the candidate, so nothing to forget and no transfer.
    assert (c.forgetting, c.backward_transfer, c.vs_champions) == (None, None, ())
    assert report.average_forgetting == pytest.approx(0.15)
    assert report.backward_transfer == pytest.approx(0.15)


def test_forgetting_is_floored_at_zero_and_bwt_keeps_its_sign() -> None:
    report = forgetting_report(["p", "cand"], {"p": {"a": 2.0}, "cand": {"a": 1.5}}, parent="p", champions=["p"])
    assert report.average_forgetting == 0.0
    assert report.backward_transfer == pytest.approx(0.5)


def test_json_carries_every_figure() -> None:
    data = forgetting_report(VERSIONS, LOSSES, parent="p", champions=["c0", "c1"]).to_json()
    assert data["candidate"] == "cand"
    assert data["champions"] == ["c0", "c1"]
    assert data["average_forgetting"] == pytest.approx(0.15)
    assert data["domains"]["a"]["best_earlier"]["version_id"] == "p"
    assert data["domains"]["b"]["vs_parent"] is None
    assert data["losses"]["p"] == {"a": 1.4}


def test_a_root_candidate_has_no_figures() -> None:
    report = forgetting_report(["v1"], {"v1": {"a": 1.0}}, parent=None, champions=[])
    assert (report.average_forgetting, report.backward_transfer) == (None, None)


@pytest.mark.parametrize(
    ("versions", "losses", "parent", "champions", "message"),
    [
        ([], {}, None, [], "at least the candidate"),
        (["a", "a"], {}, None, [], "twice"),
        (["a", "b"], {"z": {"d": 1.0}}, None, [], "not in the lineage"),
        (["a", "b"], {"b": {"d": float("nan")}}, None, [], "finite"),
        (["a", "b"], {"b": {"d": -1.0}}, None, [], "finite and ≥ 0"),
        (["a", "b"], {}, "b", [], "parent 'b' is not an earlier version"),
        (["a", "b"], {}, None, ["x"], "champion 'x'"),
    ],
)
def test_bad_tables_are_refused(
    versions: list[str], losses: dict[str, dict[str, float]], parent: str | None, champions: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        forgetting_report(versions, losses, parent=parent, champions=champions)
