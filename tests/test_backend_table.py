"""The README's table of what each model answers is generated from the tree, and current."""

from unisegtext.backends.table import answered, main


def test_readme_models_table_is_current():
    assert main(["--check"]) == 0, "run: python -m unisegtext.backends.table"


def test_answered_counts_complete_unions_only():
    total = set(answered("totalsegmentator:total"))
    assert {"liver", "kidney_left", "kidney"} <= total  # kidney = left + right
    assert "heart_left_atrium" not in total  # only its appendage is a class: parts never answer for a whole
