"""Checks Switchboard's deployment files for what the cluster depends on.

Run by tests/tests/deploy_manifests.rs with the test script's virtual
environment (PyYAML comes with kubernetes-validate). Prints one JSON object
per check: {"file", "check", "ok", "detail"}. The Kubernetes manifests are
validated against the Kubernetes schemas by kubernetes-validate separately.
"""
import glob
import json
import os
import re
import sys

import yaml

ROOT = sys.argv[1]


def report(file, check, ok, detail=""):
    print(json.dumps({"file": os.path.relpath(file, ROOT), "check": check, "ok": bool(ok), "detail": str(detail)}))


def seconds(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", str(text).strip())
    if not m:
        return None
    n = float(m.group(1))
    return {"ms": n / 1000, "s": n, "m": n * 60, None: n}[m.group(2)]


def node_grace_above_drain(path, node):
    drain = float(node["environment"].get("SWITCHBOARD_DRAIN_SECS", 10))
    drain += float(node["environment"].get("SWITCHBOARD_DRAIN_SPREAD_SECS", 5))
    grace = seconds(node.get("stop_grace_period", "10s"))
    report(path, "node stop grace period above the drain", grace and grace > drain + 2, f"{grace}s vs {drain}s")


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def kubernetes():
    docs = []
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy/kubernetes/*.yaml"))):
        with open(path) as f:
            docs += [(path, d) for d in yaml.safe_load_all(f) if d]
    by = {(d["kind"], d["metadata"]["name"]): (p, d) for p, d in docs}
    path, node = by[("Deployment", "switchboard-node")]
    spec = node["spec"]["template"]["spec"]
    c = spec["containers"][0]
    drain = float(env_of(c).get("SWITCHBOARD_DRAIN_SECS") or 10)
    drain += float(env_of(c).get("SWITCHBOARD_DRAIN_SPREAD_SECS") or 5)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    report(path, "node termination grace above the drain", grace > drain + 2, f"grace {grace}s, drain {drain}s")
    report(path, "node readiness on /health", c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/health")
    report(path, "node liveness does not use /health (503 while draining)",
           "httpGet" not in c.get("livenessProbe", {}) or c["livenessProbe"]["httpGet"].get("path") != "/health")
    report(path, "node advertises its pod IP", any("$(POD_IP)" in a for a in c.get("args", [])))
    path, bal = by[("Deployment", "switchboard-balancer")]
    report(path, "two or more balancer replicas", bal["spec"].get("replicas", 1) >= 2, bal["spec"].get("replicas"))
    bc = bal["spec"]["template"]["spec"]["containers"][0]
    shared = [e for e in bc.get("env", []) if e["name"] == "SWITCHBOARD_COOKIE_SECRET"]
    report(path, "balancers share a cookie secret from a Secret",
           shared and "secretKeyRef" in shared[0].get("valueFrom", {}))
    path, svc = by[("Service", "switchboard")]
    report(path, "a Service in front of the balancers",
           svc["spec"]["selector"] == bal["spec"]["selector"]["matchLabels"])


def swarm():
    path = os.path.join(ROOT, "deploy/swarm/switchboard-stack.yml")
    with open(path) as f:
        stack = yaml.safe_load(f)
    node = stack["services"]["node"]
    node_grace_above_drain(path, node)
    update = node["deploy"].get("update_config", {})
    report(path, "rolling update one replica at a time", update.get("parallelism") == 1, update)
    report(path, "node names say which replica", "{{.Task.Slot}}" in node["environment"].get("SWITCHBOARD_NODE_ID", ""))
    bal = stack["services"]["balancer"]
    report(path, "balancer ports published in host mode", all(p.get("mode") == "host" for p in bal["ports"]))
    report(path, "balancer has its own health check", "8080/health" in " ".join(bal["healthcheck"]["test"]))


def compose():
    path = os.path.join(ROOT, "docker-compose.yml")
    with open(path) as f:
        doc = yaml.safe_load(f)
    node = doc["services"]["node"]
    node_grace_above_drain(path, node)
    report(path, "three nodes by default", node.get("scale") == 3, node.get("scale"))


for check in (kubernetes, swarm, compose):
    try:
        check()
    except Exception as e:  # a missing key is a failed check, not a crash
        report(check.__name__, "readable", False, repr(e))
