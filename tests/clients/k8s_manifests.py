"""Checks deploy/kubernetes/ferry-cloud.yaml offline (no cluster): the structure each kind
needs and the names that tie the objects together. Then writes what ferry-cloud itself must
check: the configuration in the Secret (OUT/cloud.toml) and the container's ports, args,
probes and mounts (OUT/pod.json).

Usage: python3 k8s_manifests.py MANIFEST OUT
Prints each problem it finds and exits 1, or prints OK. Used by tests/tests/deploy.rs.
"""
import json
import os
import sys

import yaml

manifest, out = sys.argv[1], sys.argv[2]
with open(manifest) as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
problems = []


def need(cond, what):
    if not cond:
        problems.append(what)


by_kind = {}
for d in docs:
    for key in ("apiVersion", "kind", "metadata"):
        need(key in d, "a document without %s" % key)
    need(d.get("metadata", {}).get("name"), "%s without a name" % d.get("kind"))
    by_kind.setdefault(d.get("kind"), []).append(d)

known = {("v1", "Secret"), ("apps/v1", "Deployment"), ("v1", "Service"),
         ("policy/v1", "PodDisruptionBudget"), ("autoscaling/v2", "HorizontalPodAutoscaler")}
for d in docs:
    need((d.get("apiVersion"), d.get("kind")) in known, "unexpected %s %s" % (d.get("apiVersion"), d.get("kind")))
for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Secret"):
    need(kind in by_kind, "no %s" % kind)

deployment = by_kind["Deployment"][0]
spec = deployment["spec"]
pod_labels = spec["template"]["metadata"]["labels"]
need(spec["selector"]["matchLabels"].items() <= pod_labels.items(), "the Deployment's selector misses its pods")
pod = spec["template"]["spec"]
need(len(pod["containers"]) == 1, "one container")
container = pod["containers"][0]
ports = {p["name"]: p for p in container["ports"]}
need(len(ports) == len(container["ports"]), "port names are unique")
volumes = {v["name"]: v for v in pod.get("volumes", [])}
for m in container.get("volumeMounts", []):
    need(m["name"] in volumes, "mount %s has no volume" % m["name"])
for probe in ("readinessProbe", "livenessProbe"):
    get = container.get(probe, {}).get("httpGet", {})
    need(get.get("port") in ports, "%s's port %s is not a container port" % (probe, get.get("port")))
env = {e["name"] for e in container.get("env", [])}
for arg in container.get("args", []):
    for var in [a.split(")")[0] for a in arg.split("$(")[1:]]:
        need(var in env, "args use $(%s), which is not in env" % var)

for svc in by_kind["Service"]:
    s = svc["spec"]
    need(s["selector"].items() <= pod_labels.items(), "Service %s selects no pod" % svc["metadata"]["name"])
    for p in s["ports"]:
        target = ports.get(p["targetPort"])
        need(target is not None, "Service %s targets port %s, which the pod has not" % (svc["metadata"]["name"], p["targetPort"]))
        if target:
            need(target.get("protocol", "TCP") == p.get("protocol", "TCP"),
                 "Service %s port %s: protocol %s, the pod's %s" % (svc["metadata"]["name"], p["name"], p.get("protocol"), target.get("protocol")))
for pdb in by_kind["PodDisruptionBudget"]:
    need(pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), "the PDB selects no pod")
for hpa in by_kind["HorizontalPodAutoscaler"]:
    ref = hpa["spec"]["scaleTargetRef"]
    need((ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"]), "the HPA scales something else")
    need(hpa["spec"]["minReplicas"] >= 2, "a cluster of one is no cluster")

secret_names = {s["metadata"]["name"]: s for s in by_kind["Secret"]}
config_volume = volumes.get("config", {}).get("secret", {}).get("secretName")
need(config_volume in secret_names, "the config volume's Secret is not in the manifest")

if problems:
    for p in problems:
        print("PROBLEM", p)
    sys.exit(1)
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "cloud.toml"), "w") as f:
    f.write(secret_names[config_volume]["stringData"]["cloud.toml"])
mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
with open(os.path.join(out, "pod.json"), "w") as f:
    json.dump({
        "args": container["args"],
        "ports": {n: [p["containerPort"], p.get("protocol", "TCP")] for n, p in ports.items()},
        "probes": [container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")],
        "config_mount": mounts["config"],
        "mounts": mounts,
    }, f)
print("OK")
