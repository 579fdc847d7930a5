"""ramnet.files: results are replaced whole."""

from ramnet.files import write_text_atomic


def test_write_text_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old, longer than the new text\n")
    assert write_text_atomic(path, "new\n") == path
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
