"""make_mesh: axis sizes, -1 filling, error messages, multi-slice argument validation."""

import jax
import pytest

from jaxalign.sharding import AXES, make_mesh, resolve_shape


def test_default_mesh_puts_all_devices_on_fsdp():
    mesh = make_mesh()
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize(
    "shape, expected",
    [
        ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
        ({"data": -1, "tensor": 4}, (2, 1, 4)),
        ({"data": 8}, (8, 1, 1)),
        ({"data": 1, "fsdp": 4, "tensor": 2}, (1, 4, 2)),
    ],
)
def test_mesh_shapes(shape, expected):
    mesh = make_mesh(shape)
    assert tuple(mesh.shape[a] for a in AXES) == expected
    assert mesh.devices.shape == expected


def test_explicit_devices_subset():
    mesh = make_mesh({"fsdp": -1, "tensor": 2}, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize(
    "shape, match",
    [
        ({"data": 3, "fsdp": -1}, r"\{'data': 3, 'fsdp': -1\}.*8 devices"),
        ({"data": 2, "fsdp": 2}, r"\{'data': 2, 'fsdp': 2\} has 4 devices.*8 devices"),
        ({"data": 4, "fsdp": 4}, r"16 devices in total but 8"),
        ({"data": -1, "fsdp": -1}, r"at most one axis may be -1"),
        ({"data": 0, "fsdp": -1}, r"positive or -1.*\['data'\]"),
        ({"pipeline": 2, "fsdp": -1}, r"unknown axes \['pipeline'\]"),
    ],
)
def test_mesh_errors_name_shape_and_device_count(shape, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(shape)


def test_resolve_shape_is_pure():
    assert resolve_shape({"fsdp": -1}, 64) == (1, 64, 1)
    assert resolve_shape({"data": 2, "fsdp": -1, "tensor": 4}, 64) == (2, 8, 4)


@pytest.mark.parametrize(
    "dcn, match",
    [
        ({"data": 3}, r"dcn shape \{'data': 3\} \(3 slices\) does not divide the 8 devices"),
        ({"slice": 2}, r"dcn shape .*unknown axes \['slice'\]"),
        ({"data": 0}, r"dcn shape .*positive or -1"),
    ],
)
def test_multislice_dcn_shape_validation(dcn, match):
    with pytest.raises(ValueError, match=match):
        make_mesh({"fsdp": -1}, dcn_shape=dcn)


def test_multislice_per_slice_shape_validation():
    # 2 slices of 4 devices each: a per-slice shape of 8 cannot fit.
    with pytest.raises(ValueError, match=r"per-slice \(ici\) shape \{'fsdp': 8\}.*4 devices"):
        make_mesh({"fsdp": 8}, dcn_shape={"data": 2})


def test_multislice_on_one_process_is_one_granule():
    # CPU devices have no slice_index, so processes are the DCN granules; one process here.
    mesh = make_mesh({"fsdp": -1, "tensor": 2}, dcn_shape={"data": -1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="granule|slice|process"):
        make_mesh({"fsdp": -1}, dcn_shape={"data": 2})  # 2 granules asked, 1 present
