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


for name, fn in [
    ("create_device_with_sas", create),
    ("re-create is 409", recreate_conflicts),
    ("get_device", get),
    ("unknown device is 404", get_unknown),
    ("update_twin then get_twin", twin_update_and_read),
    ("stale twin etag is 412", stale_etag),
    ("registryRead may read, not create", read_only_cannot_create),
]:
    check(name, fn)

passed = sum(results)
print(f"iothub-registry: {passed} passed, {len(results) - passed} failed")
sys.exit(0 if passed == len(results) else 1)
