"""The synthetic phantom: deterministic, anatomically placed findings, reports that say what is there."""

import numpy as np
import pytest

from samf.runtime.tools.phantom import (
    EXTRA_FINDINGS,
    EXTRAS,
    HU,
    Findings,
    make_phantom,
    parse_report,
    parsed_truth,
    render_volume,
    write_questions,
    write_report,
)


def test_same_seed_same_phantom():
    a, b = make_phantom(7, shape=(32, 48, 48)), make_phantom(7, shape=(32, 48, 48))
    assert np.array_equal(a.volume, b.volume)
    assert a.report == b.report and a.questions == b.questions
    assert not np.array_equal(a.volume, make_phantom(8, shape=(32, 48, 48)).volume)


def test_report_round_trips_to_findings():
    for seed in range(300):
        p = make_phantom(seed, shape=(8, 8, 8), spacing=(40.0, 48.0, 48.0))
        assert parse_report(p.report) == parsed_truth(p.findings), p.report


def test_questions_have_one_right_answer_among_four():
    rng = np.random.default_rng(0)
    f = Findings(nodule=True, nodule_side="left", nodule_lobe="lower", nodule_size_mm=20, effusion="right",
                 cardiomegaly=True, emphysema=False)
    for q in write_questions(f, rng):
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
        right = q["choices"]["ABCD".index(q["answer"])]
        assert right in ("right pleural effusion", "enlarged", "left lower lobe", "none of these")


def _lung_stats(findings, seed=1):
    rng = np.random.default_rng(seed)
    vol = render_volume(findings, rng, shape=(64, 96, 96), spacing=(5.0, 4.0, 4.0))
    return vol


def test_effusion_fills_the_dependent_part_of_the_named_lung():
    vol = _lung_stats(Findings(effusion="left"))
    # Patient's left is small X (RAS+); posterior is small Y; look at the lower chest.
    z = slice(20, 34)
    left_post = vol[z, 20:40, 10:40]
    right_post = vol[z, 20:40, 56:86]
    fluid = lambda v: np.mean(np.abs(v - HU["fluid"]) < 60)  # noqa: E731
    assert fluid(left_post) > fluid(right_post) + 0.2


def test_cardiomegaly_enlarges_the_heart():
    # Same seed, same anatomy: the larger heart takes room from the lungs of the lower chest.
    lung = lambda v: np.sum((v[:30] > -990) & (v[:30] < -700))  # noqa: E731
    assert lung(_lung_stats(Findings(cardiomegaly=True))) < 0.97 * lung(_lung_stats(Findings()))


def test_emphysema_lowers_lung_density():
    lung = lambda v: v[(v > -990) & (v < -700)]  # noqa: E731
    assert np.median(lung(_lung_stats(Findings(emphysema=True)))) < np.median(lung(_lung_stats(Findings()))) - 60


@pytest.mark.parametrize("side,lobe", [("left", "upper"), ("right", "lower")])
def test_nodule_sits_in_the_named_lobe(side, lobe):
    f = Findings(nodule=True, nodule_side=side, nodule_lobe=lobe, nodule_size_mm=24)
    with_n = _lung_stats(f)
    without = _lung_stats(Findings())
    # Soft tissue where normal lung was: the nodule.
    diff = (np.abs(with_n - HU["nodule"]) < 50) & (without < -700)
    zs, _, xs = np.nonzero(diff)
    assert len(zs) > 20
    assert (xs.mean() < 48) == (side == "left")
    assert (zs.mean() > 32) == (lobe == "upper")


def test_reports_state_normal_findings_too():
    rng = np.random.default_rng(3)
    text = write_report(Findings(), rng)
    assert parse_report(text) == parsed_truth(Findings())


def _only(spec) -> Findings:
    """Findings with ``spec``'s finding alone present (left upper lobe / left side where it has a place)."""
    return Findings(**{spec.name: {"bool": True, "side": "left", "location": "left upper"}[spec.kind]})


@pytest.mark.parametrize("spec", EXTRA_FINDINGS, ids=lambda spec: spec.name)
def test_each_further_finding_is_drawn(spec):
    """Every CT-RATE finding beyond the first four changes the image where it should be (same seed)."""
    base = render_volume(Findings(), np.random.default_rng(1))
    vol = render_volume(_only(spec), np.random.default_rng(1))
    changed = np.abs(vol - base) > 150           # noise is 15 HU: 150 is far beyond it
    assert changed.sum() >= 20
    zs, _, xs = np.nonzero(changed)
    if spec.kind != "bool":
        assert xs.mean() < 48                    # the patient's left: small X
    if spec.kind == "location":
        assert zs.mean() > 32                    # upper lobe
    if spec.name == "medical_material":
        assert vol.max() > 2000                  # metal


def test_phantom_labels_read_back_from_reports():
    from samf.train.labels import CTRATE_LABELS, report_labels, truth_labels

    seen = set()
    for seed in range(300):
        p = make_phantom(seed, shape=(8, 8, 8), spacing=(40.0, 48.0, 48.0))
        truth = truth_labels(p.findings.to_dict())
        assert report_labels(p.report) == truth, p.report
        seen |= {k for k, v in truth.items() if v}
    assert seen == set(CTRATE_LABELS)            # all 18 occur in 300 phantoms


def test_labeller_reads_ctrate_style_sentences():
    from samf.train.labels import report_labels

    def pos(t):
        return {k for k, v in report_labels(t).items() if v}

    assert pos("No pleural effusion or pneumothorax was detected.") == set()
    assert pos("Pleural effusion was not observed. Heart size is normal.") == set()
    assert pos("Bilateral pleural effusion is present. No nodule.") == {"Pleural effusion"}
    assert pos("Calcified atheroma plaques are observed in the aorta and coronary arteries.") == {
        "Arterial wall calcification", "Coronary artery wall calcification"}
    assert pos("Subsegmental atelectasis in both lower lobes; ground-glass densities in the right lung.") == {
        "Atelectasis", "Lung opacity"}


def test_every_findings_field_beyond_the_first_four_has_its_record():
    import dataclasses

    assert set(EXTRAS) == {f.name for f in dataclasses.fields(Findings)[7:]} and len(EXTRAS) == 14


@pytest.mark.parametrize("spec", EXTRA_FINDINGS, ids=lambda spec: spec.name)
def test_each_further_finding_is_reported_parsed_labelled_and_asked(spec):
    """From its one record: the report states it (with its place), the parser and the CT-RATE labeller read it
    back, and the 'which abnormality' question has it as the answer."""
    from samf.train.labels import report_labels, truth_labels

    f = _only(spec)
    for seed in range(4):  # every sentence of its bank
        rng = np.random.default_rng(seed)
        text = write_report(f, rng)
        assert parse_report(text) == parsed_truth(f), text
        labels = report_labels(text)
        assert labels == truth_labels(f.to_dict()) and labels[spec.label], text
        q = write_questions(f, rng)[-1]
        assert q["choices"]["ABCD".index(q["answer"])] == spec.option
