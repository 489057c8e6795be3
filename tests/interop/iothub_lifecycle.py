"""Judge helper: Microsoft's azure-iot-hub IoTHubRegistryManager manages a device on the test
hub's registry REST side while Microsoft's Node device SDK sends as it over AMQP (run.sh).

Usage: iothub_lifecycle.py OWNER_CS create|disable|delete DEVICE_ID
(REQUESTS_CA_BUNDLE names the registry's CA). `create` prints the device's primary key.
Prints PASS/FAIL lines; exits 1 on failure.
"""
import sys

from azure.iot.hub import IoTHubRegistryManager

owner_cs, action, device_id = sys.argv[1], sys.argv[2], sys.argv[3]
rm = IoTHubRegistryManager(owner_cs)
try:
    if action == "create":
        d = rm.create_device_with_sas(device_id, None, None, "enabled")
        assert d.device_id == device_id and d.status == "enabled", d
        print(d.authentication.symmetric_key.primary_key)
    elif action == "disable":
        d = rm.get_device(device_id)
        keys = d.authentication.symmetric_key
        u = rm.update_device_with_sas(device_id, d.etag, keys.primary_key, keys.secondary_key, "disabled")
        assert u.status == "disabled", u.status
        assert rm.get_device(device_id).status == "disabled"
    elif action == "delete":
        rm.delete_device(device_id)
        try:
            rm.get_device(device_id)
            raise AssertionError("the deleted device is still there")
        except Exception as e:  # noqa: BLE001 - the SDK raises HttpOperationError
            status = getattr(getattr(e, "response", None), "status_code", None)
            assert status == 404, f"status {status}: {e}"
    else:
        raise SystemExit(f"unknown action {action}")
    print(f"PASS azure-iot-hub {action} {device_id}", file=sys.stderr)
except Exception as e:  # noqa: BLE001 - a judge reports every failure
    print(f"FAIL azure-iot-hub {action} {device_id}: {type(e).__name__}: {e}")
    sys.exit(1)
