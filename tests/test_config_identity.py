"""shared/config_identity.py: the config hash (stable across versions: every checkpoint
stores one) and the changed keys, dotted, hashed keys only."""

from __future__ import annotations

import pytest

from shared import config as cfg
from shared.config_identity import ABSENT, changes, config_hash, describe


def test_the_hash_of_a_default_config_is_the_one_checkpoints_already_store():
    """Pinned: a different value would make every existing checkpoint unresumable."""
    c = cfg.resolve({"model": "m", "data": "d"})
    assert c.hash() == config_hash(c.to_dict()) == "9879df303cad6775"
    c = cfg.resolve({"model": "m", "data": "d", "lora_parameters": {"rank": 16},
                     "training": {"streaming": True}})
    assert c.hash() == "8735fa0010b44dfe"


def test_changes_are_the_hashed_keys_nested_and_dotted():
    old = cfg.resolve({"model": "m", "data": "d"}).to_dict()
    new = cfg.resolve({"model": "m", "data": "d", "lora_parameters": {"rank": 16},
                       "seed": 3, "iters": 5, "batch_size": 1,  # not hashed: not named
                       "training": {"streaming": True, "warmup_steps": 7}}).to_dict()
    found = changes(old, new)
    assert [k for k, _, _ in found] == ["lora_parameters.rank", "seed",
                                        "training.warmup_steps"]
    assert describe(found) == ("lora_parameters.rank: 8 -> 16, seed: 0 -> 3, "
                               "training.warmup_steps: 50 -> 7")


def test_a_key_one_side_lacks_is_absent():
    old = cfg.resolve({"model": "m", "data": "d"}).to_dict()
    new = dict(old, mask_prompt=True)
    del old["mask_prompt"]  # a checkpoint from before the key existed
    found = changes(old, new)
    assert found == [("mask_prompt", ABSENT, True)]
    assert describe(found) == "mask_prompt: absent -> true"


@pytest.mark.parametrize("old,new", [
    ({"keys": (1, 2)}, {"keys": [1, 2]}),  # a tuple and a list hash alike
    ({"iters": 5}, {"iters": 10}),  # excluded
    ({"training": {"compile": True}}, {"training": {"compile": False}}),  # excluded, nested
    ({"resume_adapter_file": None}, {}),  # None: as if absent (older runs' hash)
])
def test_what_the_hash_ignores_is_no_change(old, new):
    assert changes(old, new) == []
    assert config_hash(old) == config_hash(new)
