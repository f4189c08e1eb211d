# The worker image marketplace instances boot (Vast.ai, RunPod). The burst agent is shipped with every job, so
# the image only needs what the cells need: Python 3 with the usual scientific stack, CUDA, and an SSH server.
# Local and SSH providers never use an image: they run the machine's own Python.
#
#   docker build -f images/worker.Dockerfile -t ghcr.io/OWNER/burst-worker:0.1.0 images/
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE}

# openssh-server: the client reaches the agent over SSH (Vast and RunPod map port 22 and inject the key).
# rsync and tini: cheap, and handy for users' own cells; tini reaps the agent's detached processes as PID 1.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssh-server rsync tini \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /run/sshd \
 && sed -i 's/^#\?PasswordAuthentication .*/PasswordAuthentication no/' /etc/ssh/sshd_config

# cloudpickle lets --push carry functions and classes defined in the notebook.
RUN python3 -m pip install --no-cache-dir cloudpickle numpy

EXPOSE 22
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["/usr/sbin/sshd", "-D", "-e"]
