"""Fuzzing fleet files: TOML documents generated from the fleet schema, with any value in any field, and arbitrary
text. A fleet file is either refused with a ValueError that names the file, or every device in it is one the
tool may act on: a Docker host it may dial, a name no certificate confuses, no reserved variable overridden, and a
SuperLink address that stays one value in Flower's config."""

import string
import tomllib

import pytest
import tomli_w
from hypothesis import given
from hypothesis import strategies as st

from geomoe.deploy.certs import DEVICE_NAME, RESERVED_NAMES
from geomoe.deploy.fleet import registration_config, run_options
from geomoe.deploy.fleet_file import DOCKER_SCHEMES, RESERVED_ENVIRONMENT, SUPERLINK_ADDRESS, read_fleet_file

pytestmark = pytest.mark.fuzz
anything = st.one_of(
    st.text(max_size=30), st.integers(-1000, 1000), st.floats(allow_nan=False), st.booleans(),
    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)  # fmt: skip
hosts = st.one_of(
    st.sampled_from(["ssh://pi@cam-07", "unix:///var/run/docker.sock", "TCP://10.0.0.7:2375", "http://h:2375",
                     " tcp://h:2375", "10.0.0.7:2375", "ssh://", "unix://h/sock", "tcp://h:2376", "Ssh://pi@h"]),
    st.text(max_size=30),
)  # fmt: skip
names = st.one_of(st.sampled_from(["cam-07", "localhost", "superlink", "127-0-0-1", "ca", "relay"]),
                  st.text(string.ascii_lowercase + string.digits + "-._/ ", max_size=12))  # fmt: skip
environments = st.dictionaries(
    st.one_of(st.sampled_from(sorted(RESERVED_ENVIRONMENT) + ["GEOMOE_APPIO_PORT"]), st.text(max_size=8)),
    st.text(max_size=20),
    max_size=3,
)
devices = st.fixed_dictionaries(
    {"name": names, "host": hosts, "lat": st.one_of(st.floats(-100, 100), anything),
     "lon": st.one_of(st.floats(-200, 200), anything)},
    optional={"role": st.sampled_from(["supernode", "runtime", "camera", 3]), "environment": st.one_of(environments,
              anything), "cpus": anything, "memory": anything, "command": anything, "data": anything},
)  # fmt: skip
fleets = st.fixed_dictionaries(
    {"image": st.text(max_size=10), "tls": st.just(False),
     "superlink": st.one_of(st.sampled_from(["127.0.0.1:9092", '1.2.3.4:1"\ninsecure = true\n#', "[::1]:9092"]),
                            st.text(max_size=30)),
     "device": st.one_of(st.lists(devices, max_size=3), anything)},
)  # fmt: skip


def assert_safe(path) -> None:
    try:
        fleet = read_fleet_file(path)
    except ValueError as error:
        assert str(path) in str(error) or "TOML" in type(error).__name__ or "Invalid" in str(error)
        return
    assert SUPERLINK_ADDRESS.fullmatch(fleet.superlink)
    connection = tomllib.loads(registration_config(fleet.__class__(**{**vars(fleet), "certs": path.parent})))
    assert set(connection["superlink"]["fleet"]) == {"address", "root-certificates"}
    for device in fleet.devices:
        assert device.host.split("://")[0] in DOCKER_SCHEMES and device.host == device.host.strip()
        assert DEVICE_NAME.match(device.name) and device.name not in RESERVED_NAMES
        environment = run_options(device, fleet)["environment"]
        assert environment["GEOMOE_TLS"] == "0" and environment["GEOMOE_LAT"] == str(device.lat)


@given(fleets)
def test_a_fleet_file_from_the_schema_is_refused_by_name_or_safe_to_act_on(tmp_path_factory, fleet):
    path = tmp_path_factory.mktemp("fleet") / "fleet.toml"
    path.write_text(tomli_w.dumps(fleet))
    assert_safe(path)


@given(st.text(max_size=300))
def test_any_text_as_a_fleet_file_is_refused_or_safe_to_act_on(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fleet") / "fleet.toml"
    path.write_text(text)
    assert_safe(path)
