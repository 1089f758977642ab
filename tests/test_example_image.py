"""The example image the templates select, copied into ComfyUI's input folder when ComfyUI loads the pack: under its
own name, byte for byte the pack's asset, and never over a file that is already there."""

import sys
import types

from concept_express.nodes.example import EXAMPLE_IMAGE_NAME, SOURCE, install_example_image


def test_copies_the_asset_under_its_own_name(tmp_path):
    target = install_example_image(tmp_path)
    assert target == tmp_path / EXAMPLE_IMAGE_NAME
    assert target.read_bytes() == SOURCE.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [EXAMPLE_IMAGE_NAME]  # no temporary file left


def test_never_touches_a_file_that_is_there(tmp_path):
    mine = tmp_path / EXAMPLE_IMAGE_NAME
    mine.write_bytes(b"the user's own picture")
    before = mine.stat().st_mtime_ns
    assert install_example_image(tmp_path) == mine
    assert mine.read_bytes() == b"the user's own picture" and mine.stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [EXAMPLE_IMAGE_NAME]


def test_uses_the_running_comfyuis_input_folder_and_nothing_outside_comfyui(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    assert install_example_image() is None  # plain `import concept_express`: no ComfyUI, nothing written
    fake = types.ModuleType("folder_paths")
    fake.get_input_directory = lambda: str(tmp_path / "input")
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    assert install_example_image() == tmp_path / "input" / EXAMPLE_IMAGE_NAME
    assert (tmp_path / "input" / EXAMPLE_IMAGE_NAME).read_bytes() == SOURCE.read_bytes()


def test_an_unwritable_input_folder_does_not_stop_the_pack_loading(tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the input folder should be")
    assert install_example_image(blocker / "input") is None
    assert "could not copy the example image" in capsys.readouterr().err
