"""`pcm --help` names every task (the image ones with their cameras) and every policy config."""
import pytest

from pcm_policy.cli import main
from pcm_policy.config import CONFIG_DIR
from pcm_policy.tasks import TASKS


def test_help_lists_tasks_and_policies(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for task in TASKS.values():
        assert task.name in text
        for camera in task.cameras:
            assert camera in text
    assert "pusht_image (img, policy=unet_small_image)" in text
    for config in CONFIG_DIR.glob("policy/*.yaml"):
        assert config.stem in text
    assert "image unet_dp_image, unet_small_image, unet_small_image_robomimic" in text
