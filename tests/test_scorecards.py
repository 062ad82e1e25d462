"""Scorecards: YAML read against SCORECARD_SCHEMA, errors naming the line and the field, confined paths."""

from __future__ import annotations

import pytest

from plexus_mcp_jupyter.core.errors import InvalidArgument, NotFound
from plexus_mcp_jupyter.evaluations.scorecards import SCORECARD_SCHEMA, SampleSpec, load_scorecard
from plexus_mcp_jupyter.evaluations.scorers import scorer_from_spec

CARD = """\
name: support-triage
description: Ticket topic scorers
dataset: example:topics
input_column: text
label_column: label
id_column: id
sample: {n: 100, seed: 7}
scores:
  - name: stored predictions
    scorer: column:prediction
  - name: keyword rules
    label_column: gold
    scorer:
      kind: rules
      rules:
        - {pattern: "refund|charged", label: billing}
        - {keywords: [parcel, tracking], label: shipping}
      default: other
"""


def test_a_scorecard_reads_into_a_scorecard():
    card = load_scorecard(CARD)
    assert (card.name, card.dataset, card.input_column, card.label_column, card.id_column) == (
        "support-triage",
        "example:topics",
        "text",
        "label",
        "id",
    )
    assert card.sample == SampleSpec(n=100, seed=7)
    assert [score.name for score in card.scores] == ["stored predictions", "keyword rules"]
    assert card.scores[0].scorer == {"kind": "column", "column": "prediction"}
    assert [card.label_column_for(score) for score in card.scores] == ["label", "gold"]
    assert load_scorecard(_yaml(card.to_dict())) == card  # to_dict round-trips
    assert scorer_from_spec(card.scores[1].scorer, input_column=card.input_column).columns == ("text",)


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("dataset: example:topics", "dataset: [a, b]"), "line 3: field 'dataset': must be a string, not a list"),
        (
            ("dataset: example:topics", "dataset: 'registered:'"),
            "line 3: field 'dataset': dataset 'registered:' has no",
        ),
        (("name: support-triage\n", ""), "line 1: missing required field 'name'"),
        (("id_column: id", "id_colum: id"), "line 6: field 'id_colum': unknown field; allowed: name, description"),
        (("{n: 100, seed: 7}", "{n: 0}"), "line 7: field 'sample.n': must be at least 1, not 0"),
        (("{n: 100, seed: 7}", "{fraction: 2}"), "line 7: field 'sample.fraction': must be at most 1"),
        (("{n: 100, seed: 7}", "{seed: 7}"), "line 7: field 'sample': a sample needs exactly one of n"),
        (("{n: 100, seed: 7}", "{n: true}"), "line 7: field 'sample.n': must be a whole number, not True"),
        (
            ("name: keyword rules", "name: stored predictions"),
            "line 11: field 'scores[1].name': duplicate score name 'stored predictions' (also scores[0])",
        ),
        (
            ("scorer: column:prediction", "scorer: colum:prediction"),
            "line 10: field 'scores[0].scorer': unknown scorer kind 'colum'",
        ),
        (
            ("{keywords: [parcel, tracking], label: shipping}", "{pattern: 'parcel(', label: shipping}"),
            "line 17: field 'scores[1].scorer.rules[1].pattern': invalid regular expression 'parcel('",
        ),
        (
            ("      default: other", "      default: other\n      colour: red"),
            "line 19: field 'scores[1].scorer.colour': unknown field 'colour' for a rules scorer",
        ),
        (("    scorer: column:prediction\n", ""), "line 9: field 'scores[0]': missing required field 'scorer'"),
    ],
)
def test_errors_name_the_line_and_the_field(change, message):
    old, new = change
    assert old in CARD
    with pytest.raises(InvalidArgument) as caught:
        load_scorecard(CARD.replace(old, new, 1))
    assert message in str(caught.value)
    assert str(caught.value).startswith("scorecard line ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: [unclosed\n", "scorecard line 2: malformed YAML"),
        ("name: a\n\tdataset: b\n", "scorecard line 2: malformed YAML"),
        ("name: a\nname: b\n", "scorecard line 2: duplicate key 'name'"),
        ("- a list\n", "scorecard line 1: must be a mapping, not a list"),
        ("", "scorecard is empty; it needs name, dataset, input_column, label_column, scores"),
        (
            "name: x\ndataset: d.csv\ninput_column: t\nlabel_column: l\nscores: []\n",
            "line 5: field 'scores': needs at least 1 item(s)",
        ),
    ],
)
def test_malformed_yaml_says_where(text, message):
    with pytest.raises(InvalidArgument) as caught:
        load_scorecard(text)
    assert message in str(caught.value)


def test_a_scorecard_file_under_the_root_is_confined_like_a_dataset(tmp_path):
    root = tmp_path / "root"
    (root / "cards").mkdir(parents=True)
    (root / "cards" / "triage.yaml").write_text(CARD)
    (tmp_path / "outside.yaml").write_text(CARD)
    (root / "escape.yaml").symlink_to(tmp_path / "outside.yaml")
    card = load_scorecard("cards/triage.yaml", root_dir=root)
    assert card.name == "support-triage" and card.source == "cards/triage.yaml"
    with pytest.raises(InvalidArgument, match=r"scorecard path '\.\./outside\.yaml' contains '\.\.'"):
        load_scorecard("../outside.yaml", root_dir=root)
    with pytest.raises(InvalidArgument, match="resolves outside the Jupyter root"):
        load_scorecard("escape.yaml", root_dir=root)
    with pytest.raises(InvalidArgument, match="is absolute"):
        load_scorecard(str(tmp_path / "outside.yaml"), root_dir=root)
    with pytest.raises(NotFound, match=r"no scorecard file 'cards/none\.yaml' under the Jupyter root"):
        load_scorecard("cards/none.yaml", root_dir=root)


def test_errors_in_a_file_name_the_file(tmp_path):
    (tmp_path / "bad.yml").write_text(CARD.replace("label_column: label\n", ""))
    with pytest.raises(InvalidArgument, match=r"scorecard 'bad.yml' line 1: missing required field 'label_column'"):
        load_scorecard("bad.yml", root_dir=tmp_path)


def test_the_schema_names_every_field_the_loader_accepts():
    assert set(SCORECARD_SCHEMA["required"]) == {"name", "dataset", "input_column", "label_column", "scores"}
    assert set(SCORECARD_SCHEMA["properties"]) == set(load_scorecard(CARD).to_dict())
    item = SCORECARD_SCHEMA["properties"]["scores"]["items"]
    assert set(item["properties"]) == {"name", "scorer", "label_column"}
