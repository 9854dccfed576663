import json

import pytest

from adapters.errors import AdapterValidationError, LoraswapError
from adapters.manifest import SCHEMA_VERSION, Manifest
from adapters.ref import AdapterRef, validate_alias, validate_name


def _manifest_dict(**over):
    data = {
        "schema_version": SCHEMA_VERSION,
        "name": "sentiment",
        "version": 1,
        "task": "classification",
        "base_model": {"name": "tiny-bert", "fingerprint": "sha256:abc"},
        "labels": ["neg", "pos"],
        "lora": {"r": 4, "alpha": 8, "targets": ["query", "value"]},
        "files": {"adapter_model.safetensors": "00"},
    }
    data.update(over)
    return data


@pytest.mark.parametrize("name", ["a", "sentiment", "bank-77_v2.1", "0" * 64])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "../etc", "a/../b", "Upper", "a" * 200, "-x", ".hidden", "a b", "a..b", "x/y"]
)
def test_invalid_names(name):
    with pytest.raises(AdapterValidationError, match="invalid adapter name"):
        validate_name(name)


def test_ref_parse_roundtrip():
    assert AdapterRef.parse("s") == AdapterRef("s")
    assert AdapterRef.parse("s@3") == AdapterRef("s", version=3)
    assert AdapterRef.parse("s@stable") == AdapterRef("s", alias="stable")
    for text in ["s", "s@3", "s@canary"]:
        assert str(AdapterRef.parse(text)) == text
    for bad in ["S@1", "s@0", "s@", "s@Bad", "../x@1"]:
        with pytest.raises(AdapterValidationError):
            AdapterRef.parse(bad)


def test_alias_cannot_be_number():
    with pytest.raises(AdapterValidationError, match="number"):
        validate_alias("12")


def test_error_status_codes():
    from adapters import errors

    assert errors.AdapterNotFoundError("x").status == 404
    assert errors.AdapterValidationError("x").status == 422
    assert errors.AdapterConflictError("x").status == 409
    assert errors.RegistryError("x").status == 503
    assert isinstance(errors.RegistryError("x"), LoraswapError)
    assert errors.RegistryError("boom").message == "boom"


def test_manifest_save_load_roundtrip(tmp_path):
    m = Manifest.model_validate(_manifest_dict())
    m.save(tmp_path)
    assert Manifest.load(tmp_path) == m


def test_manifest_missing(tmp_path):
    with pytest.raises(AdapterValidationError, match="no loraswap.json"):
        Manifest.load(tmp_path)


def test_manifest_invalid_json(tmp_path):
    (tmp_path / "loraswap.json").write_text("{not json")
    with pytest.raises(AdapterValidationError, match="invalid JSON"):
        Manifest.load(tmp_path)


def test_manifest_newer_schema(tmp_path):
    (tmp_path / "loraswap.json").write_text(
        json.dumps(_manifest_dict(schema_version=SCHEMA_VERSION + 1, extra=1))
    )
    with pytest.raises(AdapterValidationError, match="newer than this loraswap supports"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"task": "translation"}, "task"),
        ({"name": "../evil"}, "invalid adapter name"),
        ({"version": 0}, "version"),
        ({"surprise": 1}, "surprise"),
        ({"schema_version": None}, "schema_version"),
        ({"calibration": {"temperature": 0}}, "calibration.temperature"),
        ({"calibration": {"temperature": 1.5, "bins": 15}}, "calibration.bins"),
        ({"min_score": 1.2}, "min_score"),
    ],
)
def test_manifest_invalid_fields(tmp_path, over, match):
    (tmp_path / "loraswap.json").write_text(json.dumps(_manifest_dict(**over)))
    with pytest.raises(AdapterValidationError, match=match):
        Manifest.load(tmp_path)


def test_manifest_calibration_is_optional(tmp_path):
    """Manifests written before calibration load unchanged; a calibrated one keeps its fields."""
    (tmp_path / "loraswap.json").write_text(json.dumps(_manifest_dict()))
    old = Manifest.load(tmp_path)
    assert old.calibration is None and old.min_score is None
    (tmp_path / "loraswap.json").write_text(json.dumps(_manifest_dict(calibration={"temperature": 1.7}, min_score=0.4)))
    new = Manifest.load(tmp_path)
    assert new.calibration.temperature == 1.7 and new.min_score == 0.4
