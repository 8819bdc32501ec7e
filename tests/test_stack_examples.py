"""The Kubernetes examples, configs/stacks/kubernetes.yaml and configs/kubernetes-run.yaml,
checked through ZenML's own models, flavor registry and `zenml stack import`.

ZenML itself is lenient where a typo hides: PipelineRunConfiguration ignores unknown keys,
settings accept extra attributes (the compiler only logs "Ignoring invalid setting
attributes"), ResourceSettings drops them silently, and pod settings merely log a warning
for Kubernetes objects with unknown fields. So the checks here also hold every key against
the model ZenML will parse it with, and the pod settings against the Kubernetes client's
own models (as ZenML's serialization_utils reads them, but raising). The typo tests prove
that each kind of mistake fails.

Needs the Kubernetes client (`pip install "kubernetes>=21.7,<26"`, ZenML's kubernetes
integration requirement): the pod settings' validators import it.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

pytest.importorskip("kubernetes", reason='needs the Kubernetes client: pip install "kubernetes<26"')

from kubernetes.utils import parse_quantity
from zenml.config.pipeline_run_configuration import PipelineRunConfiguration
from zenml.config.resource_settings import ByteUnit, ResourceSettings
from zenml.config.step_configurations import StepConfigurationUpdate
from zenml.enums import StackComponentType
from zenml.integrations.kubernetes import serialization_utils
from zenml.integrations.kubernetes.flavors import KubernetesOrchestratorSettings
from zenml.stack.flavor_registry import FlavorRegistry
from zenml.utils import settings_utils

from dalle2.config import check_run_steps, parse_config

ROOT = Path(__file__).resolve().parents[1]
RUN_FILE = ROOT / "configs" / "kubernetes-run.yaml"
STACK_FILE = ROOT / "configs" / "stacks" / "kubernetes.yaml"

GPU = "nvidia.com/gpu"
RESOURCE_NAMES = {"cpu", "memory", "ephemeral-storage", GPU}
# what a k8s stack needs: pods run images (registry + a builder), artifacts live remotely
REQUIRED_FLAVORS = {
    "orchestrator": {"kubernetes"},
    "artifact_store": {"s3"},
    "experiment_tracker": {"mlflow"},
    "container_registry": None,  # any flavor
    "image_builder": None,
}
CPU_STEPS = {"download_images", "load_pretrained_clip", "register_model"}
ONE_GPU_STEPS = {"compute_clip_embeddings", "evaluate"}
# pod settings fields holding Kubernetes objects, by the client's model class
K8S_MODELS = {
    "tolerations": "V1Toleration",
    "volumes": "V1Volume",
    "volume_mounts": "V1VolumeMount",
    "env": "V1EnvVar",
    "env_from": "V1EnvFromSource",
}


class ExampleError(ValueError):
    """An example file that ZenML or Kubernetes would misread."""


def _load(path: Path) -> dict[str, Any]:
    # through JSON: YAML aliases become copies, so a test can change one step alone
    return json.loads(json.dumps(yaml.safe_load(path.read_text())))


@functools.cache
def _flavors() -> dict[tuple[str, str], Any]:
    """ZenML's built-in and integration flavors by (component type, flavor name)."""
    registry = FlavorRegistry()
    flavors = [f() for f in (*registry.builtin_flavors, *registry.integration_flavors)]
    return {(f.type.value, f.name): f for f in flavors}


def _settings_class(key: str, stack: dict[str, Any]) -> type:
    """The settings class ZenML parses `key` with on this stack (what
    Stack.setting_classes gives once the stack is registered; checked against it below)."""
    general = settings_utils.get_general_settings()
    if key in general:
        return general[key]
    component_type, _, flavor_name = key.partition(".")
    component = stack["components"].get(component_type)
    if component is None or component["flavor"] != flavor_name:
        # ZenML would drop these settings with "Not including stack component settings"
        raise ExampleError(
            f"settings key {key}: the stack has no {component_type} of flavor {flavor_name}"
        )
    settings_class = _flavors()[(component_type, flavor_name)].implementation_class.settings_class
    if isinstance(settings_class, property):  # a property on every component class
        settings_class = settings_class.fget(None)
    if settings_class is None:
        raise ExampleError(f"settings key {key}: flavor {flavor_name} takes no settings")
    return settings_class


def _unknown_keys(model: BaseModel, raw: dict[str, Any], where: str) -> None:
    """Every key of `raw` is a field of `model` (the parsed raw), recursively."""
    unknown = sorted(set(raw) - set(type(model).model_fields))
    if unknown:
        raise ExampleError(f"{where}: unknown keys {unknown} for {type(model).__name__}")
    for key, value in raw.items():
        sub = getattr(model, key)
        if isinstance(sub, BaseModel) and isinstance(value, dict):
            _unknown_keys(sub, value, f"{where}.{key}")


def _check_pod_settings(pod: dict[str, Any], where: str) -> None:
    """Kubernetes objects as the client's models read them (ZenML only warns), resource
    names and quantities, and mounts of declared volumes."""
    try:
        for field, model in K8S_MODELS.items():
            for item in pod.get(field, []):
                serialization_utils.deserialize_kubernetes_model(item, model)
        if pod.get("affinity"):
            serialization_utils.deserialize_kubernetes_model(pod["affinity"], "V1Affinity")
        serialization_utils.deserialize_kubernetes_model(
            pod.get("resources", {}), "V1ResourceRequirements"
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ExampleError(f"{where}: {err}") from None
    for kind, amounts in pod.get("resources", {}).items():
        for name, amount in amounts.items():
            if name not in RESOURCE_NAMES:
                raise ExampleError(f"{where}.resources.{kind}: unknown resource {name}")
            try:
                parse_quantity(amount)
            except ValueError:
                raise ExampleError(
                    f"{where}.resources.{kind}.{name}: bad quantity {amount}"
                ) from None
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for mount in pod.get("volume_mounts", []):
        if mount["name"] not in volumes:
            raise ExampleError(f"{where}: volume mount {mount['name']} names no volume")


def _check_settings(settings: dict[str, Any], stack: dict[str, Any], where: str) -> dict:
    """Each settings block parsed by the class ZenML picks for its key; returns them."""
    try:
        settings_utils.validate_setting_keys(list(settings))
    except ValueError as err:
        raise ExampleError(f"{where}: {err}") from None
    parsed = {}
    for key, raw in settings.items():
        model = _settings_class(key, stack).model_validate(raw)
        _unknown_keys(model, raw, f"{where}.{key}")
        parsed[key] = model
        if isinstance(model, KubernetesOrchestratorSettings):
            for field in ("pod_settings", "orchestrator_pod_settings"):
                if field in raw:
                    _check_pod_settings(raw[field], f"{where}.{key}.{field}")
    return parsed


def _gpu_count(pod: dict[str, Any] | None) -> int:
    resources = (pod or {}).get("resources", {})
    limit = int(resources.get("limits", {}).get(GPU, 0))
    request = resources.get("requests", {}).get(GPU)
    if request is not None and int(request) != limit:  # Kubernetes requires them equal
        raise ExampleError(f"{GPU} requests {request} differ from limits {limit}")
    return limit


def _check_step_resources(name: str, parsed: dict, raw: dict, want_gpus: int) -> None:
    """The pod asks what ResourceSettings says, the GPUs the step needs, on GPU nodes only
    when it uses GPUs."""
    resources = parsed.get("resources")
    k8s = parsed.get("orchestrator.kubernetes")
    if not isinstance(resources, ResourceSettings) or k8s is None or k8s.pod_settings is None:
        raise ExampleError(
            f"step {name}: needs both resources and orchestrator.kubernetes.pod_settings"
        )
    pod = raw["orchestrator.kubernetes"]["pod_settings"]
    gpus = _gpu_count(pod)
    if gpus != (resources.gpu_count or 0) or gpus != want_gpus:
        raise ExampleError(
            f"step {name}: {gpus} pod GPUs, resources.gpu_count {resources.gpu_count}, "
            f"needs {want_gpus}"
        )
    requests = pod.get("resources", {}).get("requests", {})
    if resources.cpu_count is None or parse_quantity(requests.get("cpu", "0")) != parse_quantity(
        str(resources.cpu_count)
    ):
        raise ExampleError(f"step {name}: pod cpu {requests.get('cpu')} != {resources.cpu_count}")
    memory = resources.get_memory(ByteUnit.MIB)
    if memory is None or parse_quantity(requests.get("memory", "0")) != memory * 2**20:
        raise ExampleError(
            f"step {name}: pod memory {requests.get('memory')} != {resources.memory}"
        )
    tolerates_gpu = any(t.get("key") == GPU for t in pod.get("tolerations", []))
    if bool(gpus) != tolerates_gpu or bool(gpus) != bool(pod.get("node_selectors")):
        raise ExampleError(f"step {name}: GPU steps, and only they, select and tolerate GPU nodes")


def check_run_config(run: dict[str, Any], stack: dict[str, Any]) -> None:
    """Raise ExampleError (or a ValidationError) for what ZenML or Kubernetes would misread."""
    unknown = sorted(set(run) - set(PipelineRunConfiguration.model_fields))
    if unknown:
        raise ExampleError(f"unknown top-level keys {unknown}")
    PipelineRunConfiguration.model_validate(run)  # ZenML's own parse of the whole file
    _check_settings(run.get("settings", {}), stack, "settings")
    cfg = parse_config(run["parameters"]["config"])  # the pipeline's own strict model
    if cfg.device != "cuda":
        raise ExampleError(f"parameters.config.device is {cfg.device}, not cuda")
    steps = run["steps"]
    check_run_steps(steps, cfg)  # only this pipeline's steps, all tracked
    sections = {"train_prior": cfg.prior}
    sections.update({f"train_decoder_unet_{i}": s for i, s in enumerate(cfg.decoder)})
    running = set(sections) | CPU_STEPS | ONE_GPU_STEPS
    if missing := sorted(running - set(steps)):
        raise ExampleError(f"steps without resources: {missing}")
    tracker = stack["components"]["experiment_tracker"]["name"]
    for name, step in steps.items():
        _unknown_keys(StepConfigurationUpdate.model_validate(step), step, f"steps.{name}")
        if step.get("experiment_tracker") != tracker:
            raise ExampleError(f"step {name}: experiment_tracker is not the stack's {tracker}")
        parsed = _check_settings(step.get("settings", {}), stack, f"steps.{name}.settings")
        # torchrun starts train.num_processes ranks, one per GPU
        want = (
            sections[name].train.num_processes if name in sections else int(name in ONE_GPU_STEPS)
        )
        _check_step_resources(name, parsed, step["settings"], want)


def check_stack(stack: dict[str, Any]) -> None:
    """The file `zenml stack import` reads: its layout, flavors ZenML has, and only the
    configuration keys of each flavor's config class (what ZenML's registration refuses)."""
    if sorted(stack) != ["components", "stack_name", "zenml_version"]:
        raise ExampleError(f"stack file keys {sorted(stack)}")
    for ctype, component in stack["components"].items():
        try:
            StackComponentType(ctype)
        except ValueError:
            raise ExampleError(f"unknown component type {ctype}") from None
        if not set(component) <= {"name", "type", "flavor", "configuration"}:
            raise ExampleError(f"{ctype}: keys {sorted(component)}")
        if component.get("type", ctype) != ctype:
            raise ExampleError(f"{ctype}: type {component['type']}")
        flavor = _flavors().get((ctype, component["flavor"]))
        if flavor is None:
            raise ExampleError(f"{ctype}: ZenML has no flavor {component['flavor']}")
        extra = sorted(set(component["configuration"]) - set(flavor.config_class.model_fields))
        if extra:
            raise ExampleError(f"{ctype} {component['flavor']}: unknown configuration keys {extra}")
    for ctype, flavors in REQUIRED_FLAVORS.items():
        component = stack["components"].get(ctype)
        if component is None or (flavors and component["flavor"] not in flavors):
            raise ExampleError(f"the stack needs a {ctype} of flavor {flavors or 'any'}")


def test_run_config_and_stack_pass() -> None:
    stack = _load(STACK_FILE)
    check_stack(stack)
    check_run_config(_load(RUN_FILE), stack)


def _at(d: dict, path: str) -> dict:
    """The mapping at a '/'-separated path (keys hold dots: orchestrator.kubernetes)."""
    for key in filter(None, path.split("/")):
        d = d[int(key)] if isinstance(d, list) else d[key]
    return d


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


K8S = "settings/orchestrator.kubernetes"
POD = "steps/{}/" + K8S + "/pod_settings"
# (what, path, key, new name): a key renamed, as a typo does
RUN_RENAMES = [
    ("top-level key", "", "steps", "step"),
    ("step name", "steps", "train_prior", "train_prir"),
    ("step key", "steps/evaluate", "experiment_tracker", "experiment_trackr"),
    ("settings key", "steps/train_prior/settings", "orchestrator.kubernetes", "orchestrator.k8s"),
    ("resources key", "steps/train_prior/settings/resources", "gpu_count", "gpu_cont"),
    ("k8s settings key", "steps/train_decoder_unet_1/" + K8S, "pod_settings", "pod_setings"),
    ("pod settings key", POD.format("train_prior"), "node_selectors", "node_selector"),
    ("toleration key", POD.format("evaluate") + "/tolerations/0", "effect", "efect"),
    ("volume key", POD.format("download_images") + "/volumes/0", "persistentVolumeClaim", "pvc"),
    ("resource name", POD.format("train_decoder_unet_0") + "/resources/limits", GPU, GPU + "s"),
    ("orchestrator pod", K8S + "/orchestrator_pod_settings", "resources", "resource"),
    ("docker settings key", "settings/docker", "apt_packages", "apt_package"),
    ("pipeline parameter", "parameters/config/prior/train", "steps", "stpes"),
]
# (what, path, key, value): a value that ZenML, Kubernetes or the pipeline would misread
RUN_CHANGES = [
    ("resources value", "steps/evaluate/settings/resources", "gpu_count", 2),
    ("memory unit", "steps/register_model/settings/resources", "memory", "8G"),
    ("quantity", POD.format("train_prior") + "/resources/requests", "memory", "1000GB"),
    ("gpus vs num_processes", POD.format("train_prior") + "/resources/limits", GPU, "4"),
    ("gpu on a cpu step", POD.format("register_model") + "/resources/limits", GPU, "1"),
    ("mount of no volume", POD.format("evaluate") + "/volume_mounts/0", "name", "shard"),
    ("device", "parameters/config", "device", "cpu"),
]


def _typo(rename: bool, path: str, key: str, value: Any):
    def mutate(d: dict) -> None:
        target = _at(d, path)
        if rename:
            _rename(target, key, value)
        else:
            target[key] = value

    return mutate


RUN_TYPOS = {w: _typo(True, *rest) for w, *rest in RUN_RENAMES} | {
    w: _typo(False, *rest) for w, *rest in RUN_CHANGES
}


@pytest.mark.parametrize("mutate", RUN_TYPOS.values(), ids=RUN_TYPOS.keys())
def test_a_typo_in_the_run_config_fails(mutate) -> None:
    stack, run = _load(STACK_FILE), _load(RUN_FILE)
    mutate(run)
    with pytest.raises(ValueError):  # ExampleError, pydantic's ValidationError, ConfigError
        check_run_config(run, stack)


STACK_TYPOS = {
    "config key": _typo(
        True, "components/orchestrator/configuration", "kubernetes_namespace", "namespace"
    ),
    "flavor": _typo(False, "components/orchestrator", "flavor", "kubernets"),
    "component type": _typo(True, "components", "image_builder", "image_bulder"),
    "tracker flavor": _typo(False, "components/experiment_tracker", "flavor", "wandb"),
    "missing component": lambda s: s["components"].pop("container_registry"),
}


@pytest.mark.parametrize("mutate", STACK_TYPOS.values(), ids=STACK_TYPOS.keys())
def test_a_typo_in_the_stack_file_fails(mutate) -> None:
    stack = _load(STACK_FILE)
    mutate(stack)
    with pytest.raises(ExampleError):
        check_stack(stack)


# Run in a fresh ZenML store (its own process and config folder, so no other test's ZenML
# state sees this stack): the secret the MLflow tracker's config refers to, then `zenml
# stack import` of each file given; prints the outcome as JSON.
IMPORT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import yaml
    import zenml.stack.flavor
    from click.testing import CliRunner
    from zenml.cli.stack import import_stack
    from zenml.client import Client
    from zenml.stack import StackComponent

    # ZenML asks PyPI whether it is the newest release for every flavor's docs URL while
    # it fills a fresh store; answered here, the test stays offline and 4 s faster
    zenml.stack.flavor.is_latest_zenml_version = lambda: True
    client = Client()
    client.create_secret("mlflow_secret", values={"username": "u", "password": "p"})
    out = {"imports": []}
    for path in sys.argv[1:]:
        result = CliRunner().invoke(import_stack, [path])
        out["imports"].append({"exit": result.exit_code, "error": repr(result.exception)})
    print("RESULT" + json.dumps(out), flush=True)  # shown if what follows fails
    model = client.get_stack(yaml.safe_load(open(sys.argv[1]))["stack_name"])
    out["components"] = {t.value: c[0].flavor_name for t, c in model.components.items()}
    out["names"] = {t.value: c[0].name for t, c in model.components.items()}
    # what Stack.setting_classes gives, less the S3 artifact store, whose __init__ asks AWS
    # for credentials (it has no settings class of its own)
    out["settings"] = {}
    for ctype, components in model.components.items():
        if ctype.value != "artifact_store":
            component = StackComponent.from_model(components[0])
            if (cls := component.settings_class) is not None:
                key = f"{ctype.value}.{components[0].flavor_name}"
                out["settings"][key] = f"{cls.__module__}.{cls.__qualname__}"
    print("RESULT" + json.dumps(out))
    """
)


def test_zenml_imports_the_stack_and_refuses_a_typo(tmp_path: Path) -> None:
    stack = _load(STACK_FILE)
    typo = json.loads(json.dumps(stack))  # fresh names, so nothing of the good one is reused
    typo["stack_name"] += "_typo"
    for component in typo["components"].values():
        component["name"] += "_typo"
    _rename(
        typo["components"]["orchestrator"]["configuration"], "kubernetes_namespace", "namespace"
    )
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
    env = {**os.environ, "ZENML_CONFIG_PATH": str(tmp_path / "zenml")}
    env.pop("ZENML_REPOSITORY_PATH", None)
    script = tmp_path / "import_stack.py"  # a file: ZenML finds its source root from it
    script.write_text(IMPORT_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(STACK_FILE), str(tmp_path / "typo.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT"))
    good, bad = out["imports"]
    assert good["exit"] == 0, good
    assert bad["exit"] != 0 and "namespace" in bad["error"], bad
    assert out["components"] == {t: c["flavor"] for t, c in stack["components"].items()}
    assert out["names"] == {t: c["name"] for t, c in stack["components"].items()}
    # the classes this test parses the run config's settings with are the stack's own
    run = _load(RUN_FILE)
    keys = {k for s in run["steps"].values() for k in s.get("settings", {})} | set(run["settings"])
    for key in keys - set(settings_utils.get_general_settings()):
        cls = _settings_class(key, stack)
        assert out["settings"][key] == f"{cls.__module__}.{cls.__qualname__}"
