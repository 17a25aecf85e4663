#!/usr/bin/env bash
# Gradescope runs this once, as root, while it builds the autograder image. The autograder zip is unpacked
# in /autograder/source: this file, run_autograder, and a copy of the minirspo repository in minirspo/
# (see docs/instructors.md). Nothing here depends on the assignment.
set -euo pipefail

apt-get install -y --no-install-recommends python3 python3-venv python3-pip  # present on Gradescope's images
python3 -m venv /autograder/venv  # a venv of our own: newer Ubuntu images refuse pip installs into the system
/autograder/venv/bin/pip install --upgrade pip
# the CPU build of the torch the tests run with: graders have no GPU, and the default wheel carries GBs of CUDA
/autograder/venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# editable, so the grader finds tutorials/assignments/points.json beside the package, and the package's source
# stays in /autograder/source, which run_autograder makes unreadable to submissions; dev brings hypothesis
/autograder/venv/bin/pip install -e "/autograder/source/minirspo[dev]"
# the unprivileged user submissions run as (Gradescope's advice for student code): no home, no login
id -u student >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin student
