"""What a type checker sees of the modules that compute some of their names on access (PEP 562).

A module-level ``__getattr__`` makes mypy accept *any* attribute of the module, typed ``Any``, so a
misspelled name would pass the checker and fail only at run time. ``heksher_shm.testing`` and
``heksher_shm.main_client`` hide theirs from type checkers and spell out the names they serve; this
runs mypy (once, on several small programs) and checks that the real names pass and misspelled ones
are errors.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy comes with the lint extra")

GOOD = """
import heksher_shm.main_client
import heksher_shm.testing
from heksher_shm.testing import HeksherService, SettingType

service: HeksherService = heksher_shm.testing.HeksherService()
kind: type[heksher_shm.testing.ServiceType] = SettingType
same: type[heksher_shm.testing.ServiceType] = heksher_shm.testing.SettingType
current = heksher_shm.main_client.Main
"""

MISSPELLED = {
    "HeksherServise": "import heksher_shm.testing\nheksher_shm.testing.HeksherServise()\n",
    "SettingsType": "from heksher_shm.testing import SettingsType\n",
    "Mian": "import heksher_shm.main_client\nprint(heksher_shm.main_client.Mian)\n",
}


def test_names_served_on_access_are_typed_and_misspelled_ones_are_errors(tmp_path: Path) -> None:
    files = {"good": GOOD, **{f"bad_{name.lower()}": source for name, source in MISSPELLED.items()}}
    for stem, source in files.items():
        (tmp_path / f"{stem}.py").write_text(textwrap.dedent(source))
    stdout, stderr, _ = mypy_api.run(
        ["--strict", "--cache-dir", str(tmp_path / "cache"), *(str(tmp_path / f"{s}.py") for s in files)]
    )
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    assert not [line for line in errors if "good.py" in line], stdout + stderr
    for name in MISSPELLED:
        mine = [line for line in errors if f"bad_{name.lower()}.py" in line]
        assert any(f'attribute "{name}"' in line for line in mine), (name, stdout + stderr)
