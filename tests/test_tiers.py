"""Device tiers: the shipped profiles load and are sane; every broken file is refused by field."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.device.tiers import DEFAULT_PROFILES_DIR, Tier, TierError, find_tier, load_tier, load_tiers
from edge_runtime.errors import EdgeRuntimeError

PROFILES = Path(__file__).resolve().parent.parent / "profiles"
MIB = 1 << 20

# A valid tier as TOML literals, by key; each broken case changes one thing.
VALID = {
    "name": '"board"',
    "description": '"a test board"',
    "ram_mb": "512",
    "budget_mb": "296",
    "storage_gb": "16",
    "cores": "4",
    "cpu": '"4x Cortex-A53 @ 1.0 GHz"',
    "source": '"a datasheet"',
}


def tier_text(drop: str | None = None, **changes: str) -> str:
    values = {k: v for k, v in {**VALID, **changes}.items() if k != drop}
    return "[tier]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())


def write(directory: Path, text: str, stem: str = "board") -> Path:
    path = directory / f"{stem}.toml"
    path.write_text(text)
    return path


def test_shipped_profiles_load_and_are_sane():
    tiers = load_tiers(PROFILES)
    names = [t.name for t in tiers]
    assert sorted(names) == sorted(["generic-256mb", "pi-zero-2w", "pi-3b-plus", "pi-4b-2gb", "pi-4b-4gb",
                                    "jetson-nano-4gb"])
    assert len(set(names)) == len(names)
    budgets = [t.budget_mb for t in tiers]
    assert budgets == sorted(budgets), "load_tiers must return the smallest budget first"
    assert names[0] == "generic-256mb"
    for t in tiers:
        assert t.name == t.path.stem
        assert t.path.parent == PROFILES
        # The documented rule's smallest reserve: 64 MB + RAM/8 for the OS, 48 MB for the agent.
        assert t.ram_mb - t.budget_mb >= 64 + t.ram_mb / 8 + 48, t.name
        # Below about 60 MB the device runtime cannot even import onnxruntime.
        assert t.budget_mb >= 64, t.name
        assert t.budget_bytes < t.ram_bytes
        assert t.cores >= 1 and t.storage_gb > 0
        assert t.cpu.startswith(f"{t.cores}x "), f"{t.name}: cpu should start with its core count"
    assert {t.ram_mb for t in tiers} == {256, 512, 1024, 2048, 4096}


def test_default_directory_is_the_checkouts_profiles():
    assert DEFAULT_PROFILES_DIR == PROFILES
    assert [t.name for t in load_tiers()] == [t.name for t in load_tiers(PROFILES)]


def test_bytes_are_mebibytes(tmp_path):
    tier = load_tier(write(tmp_path, tier_text(ram_mb="256", budget_mb="95.5")))
    assert isinstance(tier, Tier)
    assert tier.ram_bytes == 256 * MIB
    assert tier.budget_bytes == int(95.5 * MIB)
    assert tier.path == tmp_path / "board.toml"


@pytest.mark.parametrize("text, field, problem", [
    (tier_text(drop="budget_mb"), "tier.budget_mb", "missing"),
    (tier_text(drop="source"), "tier.source", "missing"),
    (tier_text(budget_mb='"296"'), "tier.budget_mb", "must be a number"),
    (tier_text(ram_mb="512.0"), "tier.ram_mb", "must be an integer"),
    (tier_text(ram_mb="true"), "tier.ram_mb", "must be an integer"),
    (tier_text(cores="4.0"), "tier.cores", "must be an integer"),
    (tier_text(storage_gb='"16 GB"'), "tier.storage_gb", "must be a number"),
    (tier_text(cpu="4"), "tier.cpu", "must be a string"),
    (tier_text(description='"  "'), "tier.description", "must not be empty"),
    (tier_text(budget_mb="600"), "tier.budget_mb", "less than the installed RAM"),
    (tier_text(budget_mb="512"), "tier.budget_mb", "less than the installed RAM"),
    (tier_text(budget_mb="0"), "tier.budget_mb", "must be positive"),
    (tier_text(budget_mb="-64"), "tier.budget_mb", "must be positive"),
    (tier_text(budget_mb="nan"), "tier.budget_mb", "finite"),
    (tier_text(budget_mb="inf"), "tier.budget_mb", "finite"),
    (tier_text(ram_mb="0", budget_mb="1"), "tier.ram_mb", "must be positive"),
    (tier_text(storage_gb="0"), "tier.storage_gb", "must be positive"),
    (tier_text(cores="0"), "tier.cores", "at least 1"),
    (tier_text(budjet_mb="296"), "tier.budjet_mb", "unknown field (did you mean budget_mb?)"),
    (tier_text(gpu='"Maxwell"'), "tier.gpu", "unknown field"),
    (tier_text(name='"other-board"'), "tier.name", "a tier's name is its file stem"),
    (tier_text(name="1"), "tier.name", "must be a string"),
    ("", "[tier]", "missing"),
    ('tier = "pi"\n', "[tier]", "must be a table"),
    (tier_text().replace("[tier]", "[tiers]"), "tiers", "unknown top-level key or table"),
    (tier_text() + "[extra]\nx = 1\n", "extra", "unknown top-level key or table"),
    (tier_text(ram_mb="512 MB"), None, "not valid TOML"),
    (tier_text() + "ram_mb = 1024\n", None, "not valid TOML"),   # a duplicated key
])
def test_a_broken_tier_file_names_the_file_and_the_field(tmp_path, text, field, problem):
    path = write(tmp_path, text)
    with pytest.raises(TierError) as info:
        load_tier(path)
    err = info.value
    assert isinstance(err, EdgeRuntimeError)
    assert err.field == field
    assert err.path == path
    message = str(err)
    assert message.startswith(f"{path}: ")
    if field is not None:
        assert f"{path}: {field}: " in message
    assert problem in message


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(TierError, match="does not exist") as info:
        load_tier(tmp_path / "nowhere.toml")
    assert info.value.path == tmp_path / "nowhere.toml"


def test_load_tiers_sorts_by_budget_and_refuses_any_bad_file(tmp_path):
    write(tmp_path, tier_text(name='"big"', ram_mb="4096", budget_mb="3000"), "big")
    write(tmp_path, tier_text(name='"small"', ram_mb="256", budget_mb="96"), "small")
    write(tmp_path, tier_text(name='"mid"', ram_mb="1024", budget_mb="700.5"), "mid")
    (tmp_path / "notes.txt").write_text("not a tier")
    assert [t.name for t in load_tiers(tmp_path)] == ["small", "mid", "big"]

    bad = write(tmp_path, tier_text(name='"bad"', cores="-1"), "bad")
    with pytest.raises(TierError) as info:
        load_tiers(tmp_path)
    assert info.value.path == bad and info.value.field == "tier.cores"


def test_load_tiers_refuses_a_directory_without_tiers(tmp_path):
    with pytest.raises(TierError, match=r"no \*\.toml file"):
        load_tiers(tmp_path)
    with pytest.raises(TierError, match="does not exist"):
        load_tiers(tmp_path / "missing")


def test_find_tier_by_name_or_path(tmp_path):
    tier = find_tier("pi-zero-2w", PROFILES)
    assert (tier.name, tier.ram_mb) == ("pi-zero-2w", 512)
    assert find_tier(PROFILES / "jetson-nano-4gb.toml", tmp_path).name == "jetson-nano-4gb"
    assert find_tier(str(PROFILES / "pi-3b-plus.toml")).name == "pi-3b-plus"

    with pytest.raises(TierError) as info:
        find_tier("pi-5", PROFILES)
    message = str(info.value)
    assert "unknown tier 'pi-5'" in message
    assert "known: generic-256mb, jetson-nano-4gb, pi-3b-plus, pi-4b-2gb, pi-4b-4gb, pi-zero-2w" in message

    with pytest.raises(TierError, match="known: none"):
        find_tier("pi-zero-2w", tmp_path)


@pytest.mark.parametrize("typo, meant", [("pi-zero-3", "pi-zero-2w"), ("pi-3b-pls", "pi-3b-plus"),
                                         ("jetson-nano", "jetson-nano-4gb"), ("lab-board", None)])
def test_an_unknown_tier_names_the_closest_known_one(typo, meant):
    with pytest.raises(TierError) as info:
        find_tier(typo, PROFILES)
    message = str(info.value)
    assert f"unknown tier {typo!r}; known: generic-256mb, jetson-nano-4gb" in message
    if meant:
        assert message.endswith(f"(did you mean {meant}?)")
    else:
        assert "did you mean" not in message


def test_tiers_import_without_torch_or_onnxruntime():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edge_runtime.device import tiers\n"
            "assert tiers.find_tier('pi-4b-2gb').budget_mb > 0\n"
            "assert 'onnxruntime' not in sys.modules, 'tiers must stay light'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
