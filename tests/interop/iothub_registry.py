"""Judge: Microsoft's azure-iot-hub IoTHubRegistryManager against the test hub's registry REST.

Usage: iothub_registry.py OWNER_CS READONLY_CS (REQUESTS_CA_BUNDLE names the test hub's CA).
Prints PASS/FAIL lines and `iothub-registry: N passed, M failed` last; exits 1 on any failure.
"""
import sys
import uuid

from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import Twin, TwinProperties

owner_cs, read_cs = sys.argv[1], sys.argv[2]
results = []


def check(name, fn):
    try:
        fn()
        results.append(True)
        print(f"PASS {name}")
    except Exception as e:  # noqa: BLE001 - a judge reports every failure
        results.append(False)
        print(f"FAIL {name}: {type(e).__name__}: {e}")


def expect_status(code, call, what):
    """Runs `call`, which must fail with HTTP `code` (the SDK raises HttpOperationError)."""
    try:
        call()
    except Exception as e:  # noqa: BLE001
        status = getattr(getattr(e, "response", None), "status_code", None)
        assert status == code, f"status {status}, expected {code}"
        return
    raise AssertionError(what)


def desired(props):
    return Twin(properties=TwinProperties(desired=props))


rm = IoTHubRegistryManager(owner_cs)
dev = "judge-" + uuid.uuid4().hex[:8] + "#1"


def create():
    d = rm.create_device_with_sas(dev, None, None, "enabled")
    assert d.device_id == dev, d.device_id
    assert d.authentication.symmetric_key.primary_key, "no generated key"
    assert d.etag and d.generation_id


def recreate_conflicts():
    expect_status(409, lambda: rm.create_device_with_sas(dev, None, None, "enabled"),
                  "re-creating succeeded")


def get():
    d = rm.get_device(dev)
    assert d.device_id == dev and d.status == "enabled"


def get_unknown():
    expect_status(404, lambda: rm.get_device("nobody-" + uuid.uuid4().hex),
                  "an unknown device was found")


def twin_update_and_read():
    twin = rm.get_twin(dev)
    updated = rm.update_twin(dev, desired({"deviceName": "Kitchen"}), twin.etag)
    assert updated.properties.desired["deviceName"] == "Kitchen", updated.properties.desired
    again = rm.get_twin(dev)
    assert again.properties.desired["deviceName"] == "Kitchen"
    assert again.version > twin.version


def stale_etag():
    first = rm.get_twin(dev)
    rm.update_twin(dev, desired({"a": 1}), first.etag)
    expect_status(412, lambda: rm.update_twin(dev, desired({"a": 2}), first.etag),
                  "a stale etag was accepted")


def read_only_cannot_create():
    ro = IoTHubRegistryManager(read_cs)
    assert ro.get_device(dev).device_id == dev
    expect_status(401, lambda: ro.create_device_with_sas("ro-" + uuid.uuid4().hex[:6], None, None, "enabled"),
                  "registryRead created a device")


def bulk():
    """bulk_create_or_update_devices: 100 creates with names in one call, then a call mixing
    a create of an existing id (a per-device DeviceAlreadyExists), an update and a delete."""
    from azure.iot.hub.protocol.models import (
        AuthenticationMechanism, ExportImportDevice, PropertyContainer, SymmetricKey)

    run = uuid.uuid4().hex[:6]
    ids = [f"bulk-{run}-{i}" for i in range(100)]

    def entry(i, mode, status="enabled", name=None):
        auth = AuthenticationMechanism(type="sas", symmetric_key=SymmetricKey())
        props = PropertyContainer(desired={"deviceName": name}) if name else None
        return ExportImportDevice(id=i, import_mode=mode, status=status,
                                  authentication=auth, properties=props)

    result = rm.bulk_create_or_update_devices(
        [entry(i, "create", name=f"Unit {n}") for n, i in enumerate(ids)])
    assert result.is_successful and not result.errors, (result.is_successful, result.errors)
    for n in (0, 57, 99):
        d = rm.get_device(ids[n])
        assert d.status == "enabled" and d.authentication.symmetric_key.primary_key, d
        twin = rm.get_twin(ids[n])
        assert twin.properties.desired.get("deviceName") == f"Unit {n}", twin.properties.desired
    mixed = rm.bulk_create_or_update_devices([
        entry(ids[0], "create", name="Renamed"),
        entry(ids[1], "update", status="disabled"),
        entry(ids[2], "delete"),
    ])
    assert mixed.is_successful is False, mixed.is_successful
    errors = [(e.device_id, e.error_code) for e in mixed.errors]
    assert errors == [(ids[0], "DeviceAlreadyExists")], errors
    assert rm.get_twin(ids[0]).properties.desired.get("deviceName") == "Unit 0"
    assert rm.get_device(ids[1]).status == "disabled"
    expect_status(404, lambda: rm.get_device(ids[2]), "the bulk-deleted device is still there")
    too_many = [entry(f"{i}-x", "create") for i in ids] + [entry(f"bulk-{run}-extra", "create")]
    # Over 100 is a 400 for the whole call (the SDK hands 400 back as a result, not raising).
    try:
        refused = rm.bulk_create_or_update_devices(too_many)
        assert not refused.is_successful, "101 devices accepted"
    except Exception as e:  # noqa: BLE001
        assert getattr(getattr(e, "response", None), "status_code", None) == 400, e
    expect_status(404, lambda: rm.get_device(f"bulk-{run}-extra"), "a device of the 101 was created")


for name, fn in [
    ("create_device_with_sas", create),
    ("re-create is 409", recreate_conflicts),
    ("get_device", get),
    ("unknown device is 404", get_unknown),
    ("update_twin then get_twin", twin_update_and_read),
    ("stale twin etag is 412", stale_etag),
    ("registryRead may read, not create", read_only_cannot_create),
    ("bulk_create_or_update_devices: 100 per call, names, per-device errors", bulk),
]:
    check(name, fn)

passed = sum(results)
print(f"iothub-registry: {passed} passed, {len(results) - passed} failed")
sys.exit(0 if passed == len(results) else 1)
