"""The commands' configuration: dataclass fields -> flags with help, BLIP_* environment variables, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from blip_server.config import GatewayConfig, ServeConfig, from_env, parse_command_line
from blip_server.gateway.main import main as gateway_main
from blip_server.repository import MANIFEST
from blip_server.serve import main as serve_main


def test_configuration_comes_from_blip_environment_variables(tmp_path):
    config = from_env(ServeConfig, {"BLIP_TRITON_GRPC_PORT": "9001", "BLIP_MODEL": f"{tmp_path},b=/b",
                                    "BLIP_API_KEYS": "a,b", "BLIP_STARTUP_TIMEOUT": "12.5", "BLIP_HOST": "0.0.0.0"})
    assert (config.triton_grpc_port, config.model, config.startup_timeout, config.host) == (
        9001, (str(tmp_path), "b=/b"), 12.5, "0.0.0.0")
    assert from_env(ServeConfig, {}).triton_http_port == 8000
    with pytest.raises(ValueError, match="BLIP_TRITON_HTTP_PORT='x' is not a valid int"):
        from_env(ServeConfig, {"BLIP_TRITON_HTTP_PORT": "x"})


def test_flags_override_the_environment_which_overrides_the_defaults():
    environ = {"BLIP_PORT": "6000", "BLIP_METRICS_PORT": "9100", "BLIP_CACHE_DIR": "/var/cache/blip"}
    config = parse_command_line(ServeConfig, ["--port", "7000", "--device", "cuda"], prog="blip-serve",
                                description="", environ=environ)
    assert (config.port, config.metrics_port, config.cache_dir, config.device) == (
        7000, 9100, Path("/var/cache/blip"), "cuda")
    with pytest.raises(SystemExit):
        parse_command_line(ServeConfig, ["--device", "tpu"], prog="blip-serve", description="", environ={})


def test_triton_endpoints_repeat_on_the_command_line_or_come_comma_separated_from_the_environment():
    flags = parse_command_line(GatewayConfig, ["--triton", "a:8001", "--triton", "dns:///b:8001"], prog="blip-gateway",
                               description="", environ={"BLIP_TRITON": "ignored:1"})
    assert flags.triton == ("a:8001", "dns:///b:8001")
    env = parse_command_line(GatewayConfig, [], prog="blip-gateway", description="",
                             environ={"BLIP_TRITON": "a:8001, b:8001"})
    assert env.triton == ("a:8001", "b:8001")


def test_help_comes_from_the_fields(capsys):
    with pytest.raises(SystemExit):
        gateway_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--triton TRITON a Triton gRPC endpoint, HOST:PORT, or dns:///NAME:PORT" in text
    assert "--metrics-port METRICS_PORT port of the Prometheus metrics endpoint" in text
    assert "env BLIP_HEALTH_TIMEOUT" in text
    assert "--max-connection-age MAX_CONNECTION_AGE seconds a client's connection to the gateway may live" in text
    assert "--max-connection-age-grace MAX_CONNECTION_AGE_GRACE seconds calls in flight" in text
    assert "--drain-grace DRAIN_GRACE seconds a Triton replica that left the answer" in text


@pytest.mark.parametrize("argv, message", [
    ([], "give at least one --triton HOST:PORT"),
    (["--triton", "triton"], "Triton endpoint 'triton' is not HOST:PORT or dns:///NAME:PORT"),
])
def test_blip_gateway_refuses_what_it_cannot_serve(argv, message, capsys):
    assert gateway_main(argv) == 2
    err = capsys.readouterr().err
    assert f"blip-gateway: error: {message}" in err and "Traceback" not in err


def test_fp16_serving_needs_a_gpu(capsys):
    assert serve_main(["--precision", "fp16"]) == 2
    assert "--precision fp16 is for GPUs: give --device cuda too" in capsys.readouterr().err


def test_int8_serving_is_refused_on_a_gpu(capsys):
    assert serve_main(["--precision", "int8", "--device", "cuda"]) == 2
    assert "--precision int8 runs on CPUs only" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--precision", "int8"], "was exported with --precision fp32; --precision int8 cannot change that"),
    (["--image-processor", "torchvision"],
     "was exported with --image-processor pil; --image-processor torchvision cannot change that"),
    (["--device", "cuda", "--precision", "fp16"], "was exported with --precision fp32; --precision fp16"),
])
def test_an_exported_repository_is_not_served_otherwise_than_it_was_exported(repositories, argv, message, capsys):
    """Flags that would change an export cannot change an exported repository: refused, not silently ignored."""
    assert serve_main(["--model", str(repositories["standard"]), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_int8_repository_is_refused_on_a_gpu(repositories, tmp_path, capsys):
    int8 = tmp_path / "int8"
    shutil.copytree(repositories["standard"], int8)
    manifest = json.loads((int8 / MANIFEST).read_text())
    (int8 / MANIFEST).write_text(json.dumps({**manifest, "precision": "int8"}))
    assert serve_main(["--model", str(int8), "--device", "cuda"]) == 2
    assert "was exported with --precision int8 runs on CPUs only" in capsys.readouterr().err


def test_api_keys_come_from_the_flag_and_a_mounted_file(tmp_path):
    from blip_server.gateway.main import api_keys

    keys = tmp_path / "keys"
    keys.write_text("k2, k3\nk4\n\n")
    config = parse_command_line(GatewayConfig, ["--triton", "t:1", "--api-keys", "k1", "--api-keys-file", str(keys)],
                                prog="blip-gateway", description="", environ={})
    assert api_keys(config) == ["k1", "k2", "k3", "k4"]
    assert api_keys(GatewayConfig(api_keys_file=None)) == []


def test_a_missing_api_keys_file_stops_the_gateway_from_starting(tmp_path, capsys):
    """A gateway told to require keys never serves without them (a Secret that failed to mount)."""
    assert gateway_main(["--triton", "127.0.0.1:1", "--port", "0", "--api-keys-file", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "blip-gateway: error: cannot read --api-keys-file" in err and "No such file" in err
