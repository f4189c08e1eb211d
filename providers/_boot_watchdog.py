"""The boot watchdog: the dead-man's switch a marketplace instance holds from its first second, armed in the create
request itself (Vast ``onstart``, RunPod ``dockerArgs``), so that an instance whose kernel died while it was being
created or booting ends itself instead of billing until someone runs ``burst cleanup``.

It is a few lines of Python started in the background when the container starts. It holds no credential: it reads
the instance id and the instance-scoped key the provider injected (the same :class:`~.base.SelfDestruct` recipe the
agent uses after a lease lapses) from its own environment, else PID 1's. It ends the instance when

- no client has taken the job over for the lease, plus the provider's poll interval and :data:`FIRST_CONTACT_SLACK`
  (a client notices a running instance only at its next poll, then connects): a client is taking over while one of
  its agent commands for this job runs (its job directory is an argument of that process); or
- the client's wall clock passes :attr:`~.base.BootWatch.end_by` (the job's money or maximum duration ran out).

It stands down for good once the agent's supervisor runs (``supervisor.pid`` in the job directory): from then on
the agent's own switch governs, and a live job is never ended by this one.
"""

from __future__ import annotations

import json
import shlex

from .base import BootWatch, SelfDestruct

__all__ = ["FIRST_CONTACT_SLACK", "START_SCRIPT_LIMIT", "boot_command"]

#: Seconds on top of the lease and the poll interval for the client's first contact (SSH handshake, agent start).
FIRST_CONTACT_SLACK = 10.0
#: Vast accepts at most 4096 characters of ``onstart`` and ``args`` together (reference 1.4, create_instance.yaml
#: x-input-validation, read 2026-12-06); RunPod documents no limit for ``dockerArgs``: the same bound is kept.
START_SCRIPT_LIMIT = 4096

# No single quote in it, so that quoting it for a shell adds only the two around it. CONF is the JSON of its terms.
_SOURCE = r"""import json,os,time,urllib.request as R
from urllib.parse import quote
C=json.loads(CONF);W=C["w"];D=os.path.expanduser("~/"+W);S=C["s"];E=C["e"];X=C["x"]
def env(n):
 v=os.environ.get(n)
 if v:return v
 try:
  for l in open("/proc/1/environ","rb").read().split(b"\0"):
   k,_,v=l.partition(b"=")
   if k==n.encode() and v:return v.decode()
 except OSError:pass
def taken():
 for p in os.listdir("/proc"):
  try:
   if p.isdigit() and W.encode() in open("/proc/"+p+"/cmdline","rb").read().split(b"\0"):return 1
  except OSError:pass
def end():
 i,k=env(X["id_env"]),env(X["key_env"])
 if not(i and k):return
 b=X["body"];d=None if b is None else json.dumps(b).replace(chr(34)+"{id}"+chr(34),json.dumps(i)).encode()
 q=R.Request(X["url"].replace("{id}",quote(i,safe="")),data=d,method=X["method"],
  headers={"Authorization":"Bearer "+k,"Content-Type":"application/json","Accept":"application/json"})
 for n in range(6):
  try:
   with R.urlopen(q,timeout=60) as r:
    if b"errors" not in r.read(4096):return
  except R.HTTPError as e:
   if e.code<500 and e.code not in(408,429):return
  except Exception:pass
  time.sleep(2**n)
t=time.time()
while not os.path.exists(D+"/supervisor.pid"):
 n=time.time()
 if taken():t=n
 if E and n>E or S and n-t>S:end();break
 time.sleep(1)
"""


def boot_command(recipe: SelfDestruct, watch: BootWatch, *, workdir: str, poll_seconds: float) -> str:
    """One shell line that starts the watchdog in the background and returns at once. ``workdir`` is the job's
    directory relative to the login's home (``Instance.workdir``), exactly as the client passes it to the agent."""
    silence = watch.lease_seconds + poll_seconds + FIRST_CONTACT_SLACK if watch.lease_seconds else 0
    terms = {"w": workdir, "s": round(silence, 1), "e": round(watch.end_by, 1), "x": recipe.to_json()}
    source = _SOURCE.replace("CONF", json.dumps(json.dumps(terms, separators=(",", ":"))))  # a "..." literal
    line = f"nohup python3 -c {shlex.quote(source)} >/dev/null 2>&1 &"
    if len(line) > START_SCRIPT_LIMIT - 200:  # room for a provider's own wrapping
        raise ValueError(f"the boot watchdog is {len(line)} characters, over what a create request takes")
    return line
