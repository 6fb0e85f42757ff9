#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine, as root, in a few seconds: a munge key and munged,
# a slurm.conf with this machine's CPUs and memory, slurmctld and slurmd. For tests/test_studies.py's
# Slurm test (studies.py --launcher slurm) and .ci/run; needs Debian's slurm-wlm and munge
# (apt-get install slurm-wlm munge). Idempotent: a cluster that already answers is left as it is.
#
#   sudo bash tests/start_slurm.sh          # then: sinfo, python studies.py ... --launcher slurm
#
# No cgroups (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none), so that it starts in a
# container too; no accounting database (sacct then says accounting is off, which submitit's job
# states do without: it reads each job's result file).
set -euo pipefail

answers() { timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'; }

if command -v sinfo >/dev/null && answers; then
    echo "start_slurm.sh: a Slurm cluster already answers (sinfo); nothing to do"
    exit 0
fi
for program in munged slurmctld slurmd sinfo; do
    command -v "$program" >/dev/null || PATH="$PATH:/usr/sbin"
    command -v "$program" >/dev/null || { echo "start_slurm.sh: $program is missing: apt-get install slurm-wlm munge" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "start_slurm.sh: run it as root (the daemons run as root here)" >&2; exit 1; }

host=$(hostname -s)
cpus=$(nproc)
memory_mb=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')  # leave the system a tenth

# munge: the key (made once) and the daemon, as the munge user
if ! pgrep -x munged >/dev/null; then
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    runuser -u munge -- munged
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<EOF
# written by tests/start_slurm.sh: a one-node cluster on $host
ClusterName=studies
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
# cores only: memory is not a consumable, so a job without --mem does not hold the whole node
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 50); do  # up to 10 s for the node to register
    if answers; then
        echo "start_slurm.sh: one-node Slurm cluster up: $host, $cpus CPUs, $memory_mb MB (sinfo: $(sinfo -h -o '%P %T %c' | head -1))"
        exit 0
    fi
    sleep 0.2
done
echo "start_slurm.sh: slurmctld and slurmd started but the node does not answer; see /var/log/slurm/" >&2
exit 1
