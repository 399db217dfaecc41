"""The shared end-of-app error handling."""

import pytest

from segshare.cli import exit_on_user_error


def test_user_errors_become_one_line_and_a_status(capsys):
    with pytest.raises(SystemExit) as info:
        with exit_on_user_error("segshare-x"):
            raise FileNotFoundError("folder not found: 'a'")
    assert info.value.code == 2
    assert capsys.readouterr().err == "segshare-x: error: folder not found: 'a'\n"


def test_first_matching_code_wins_and_bugs_keep_their_traceback():
    class Special(ValueError):
        pass

    codes = [(Special, 2), (ValueError, 1)]
    for err, code in ((Special("s"), 2), (ValueError("v"), 1)):
        with pytest.raises(SystemExit) as info, exit_on_user_error("app", codes):
            raise err
        assert info.value.code == code
    with pytest.raises(KeyError), exit_on_user_error("app", codes):
        raise KeyError("a bug")
