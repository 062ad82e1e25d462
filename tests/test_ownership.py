"""Who may see whose work: one module (core/ownership.py) holds the rules; the stores' SQL and the faces' checks
agree with it, and no other module spells an API key's owner prefix again."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from plexus_mcp_jupyter.core.ownership import (
    KEY_OWNER_PREFIX,
    is_key_owner,
    key_owner,
    namespace,
    owner_visible,
    visible_to,
)

# "key:" as a string of its own or an f-string's head ("key:{...}"), not the word in prose
PREFIX_LITERAL = re.compile(r"""["']""" + re.escape(KEY_OWNER_PREFIX) + r"""(["']|\{)""")
PACKAGE = Path(__file__).resolve().parent.parent / "plexus_mcp_jupyter"
OWNERS = [None, "", "jupyter", "jupyter:alice", key_owner("k1"), key_owner("k2"), "KEY:k1", "keyring"]
VIEWERS = [None, "", "jupyter", key_owner("k1"), key_owner("k2")]


@pytest.mark.parametrize("viewer", VIEWERS)
def test_the_sql_rule_sees_exactly_what_the_python_rule_sees(viewer):
    engine = sa.create_engine("sqlite://")
    table = sa.Table("work", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True), sa.Column("owner", sa.Text))
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "owner": owner} for i, owner in enumerate(OWNERS)])
        seen = set(conn.execute(sa.select(table.c.id).where(visible_to(table.c.owner, viewer))).scalars())
    if viewer is None:  # an admin: the faces pass no condition at all
        seen = set(range(len(OWNERS)))
    assert seen == {i for i, owner in enumerate(OWNERS) if owner_visible(owner, viewer)}


def test_a_key_sees_its_own_work_and_never_another_keys():
    assert owner_visible(key_owner("k1"), key_owner("k1"))
    assert not owner_visible(key_owner("k2"), key_owner("k1"))
    assert owner_visible("jupyter", key_owner("k1")) and owner_visible(None, key_owner("k1"))
    assert is_key_owner(key_owner("k1")) and not is_key_owner("KEY:k1") and not is_key_owner(None)
    assert namespace(key_owner("k1")) == key_owner("k1") and namespace("jupyter") is None


def test_no_other_module_spells_the_key_owner_prefix():
    spelled = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "ownership.py" and PREFIX_LITERAL.search(path.read_text())
    ]
    assert spelled == [], f"use core/ownership.py (key_owner, is_key_owner) instead of the prefix in {spelled}"
