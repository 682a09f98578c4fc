"""The generated reference pages match the code: a changed setting or flag fails."""

from conftest import ROOT

from securehealth.tools import reference


def test_the_reference_pages_describe_the_code_as_it_is():
    assert reference.drifted(ROOT) == []


def test_every_setting_has_a_row_in_the_settings_reference():
    page = (ROOT / reference.SETTINGS_PAGE).read_text()
    assert [name for name in reference.settings.DEFAULTS if f"| `{name}` |" not in page] == []


def test_a_setting_the_page_does_not_describe_is_found(tmp_path):
    (tmp_path / reference.SETTINGS_PAGE).parent.mkdir(parents=True)
    (tmp_path / reference.SETTINGS_PAGE).write_text(
        reference.settings_page().replace("| `epsilon` |", "| `budget` |")
    )
    assert reference.SETTINGS_PAGE in reference.drifted(tmp_path)
