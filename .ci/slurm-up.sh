#!/usr/bin/env bash
# Bring up a real, local two-node SLURM cluster on this machine (for tests and CI).
#
# One slurmctld plus two slurmd daemons (`slurmd -N n1`, `slurmd -N n2`) that share this
# host: NodeAddr=127.0.0.1, ports 6818/6819, NodeHostname=$(hostname). Needs root and
# Debian/Ubuntu packages `slurm-wlm` + `munge` (installed here if missing).
#
# Idempotent: running it again stops the daemons it started, rewrites the config and starts
# them fresh with an empty job queue (`slurmctld -c`: jobs of the previous cluster are dropped). Exits 0 once `sinfo` shows n1 and n2 idle; otherwise prints why (plus the tail
# of the daemon logs) and exits non-zero. Prints how long the bring-up took.
#
# No accounting daemon (slurmdbd) is configured, so `sacct` does not work here; finished
# jobs stay visible to `scontrol show job` for MinJobAge seconds (1 hour).
#
# Env: SLURM_UP_TIMEOUT (seconds to wait for idle nodes, default 120).
set -euo pipefail

start_ts=$(date +%s)
timeout_s=${SLURM_UP_TIMEOUT:-120}
conf_dir=/etc/slurm
log_dir=/var/log/slurm
host=$(hostname)

die() {
  echo "slurm-up: ERROR: $*" >&2
  for f in "$log_dir"/slurmctld.log "$log_dir"/slurmd-n1.log "$log_dir"/slurmd-n2.log /var/log/munge/munged.log; do
    [ -f "$f" ] && { echo "---- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
  exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root"

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null 2>&1; then
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
  fi
fi

# 2. stop the daemons a previous run started (by their pid files; TERM, then KILL). A slurmctld
# saving job state can take several seconds; zombies (exited, not yet reaped) do not count.
alive() {  # which of the given pids still run
  for p in "$@"; do
    st=$(ps -o stat= -p "$p" 2>/dev/null || true)
    [ -n "$st" ] && [ "${st#Z}" = "$st" ] && echo "$p"
  done
  return 0
}
wait_gone() {  # tenths of a second, pids...
  local n=$1; shift
  for _ in $(seq 1 "$n"); do [ -z "$(alive "$@")" ] && return 0; sleep 0.1; done
  return 1
}
pids=""
for pf in /run/slurmctld.pid /run/slurmd-n1.pid /run/slurmd-n2.pid; do
  [ -f "$pf" ] && pids="$pids $(cat "$pf")"
done
if [ -n "$pids" ]; then
  # shellcheck disable=SC2086
  kill $pids 2>/dev/null || true
  # shellcheck disable=SC2086
  if ! wait_gone 300 $pids; then
    # shellcheck disable=SC2086
    kill -9 $(alive $pids) 2>/dev/null || true
    # shellcheck disable=SC2086
    wait_gone 100 $pids || die "slurm daemons $(alive $pids) survive kill -9"
  fi
  rm -f /run/slurmctld.pid /run/slurmd-n1.pid /run/slurmd-n2.pid
fi
strays=$(ps -eo pid=,stat=,comm= | awk '($3 == "slurmctld" || $3 == "slurmd") && $2 !~ /^Z/ {print $1}')
if [ -n "$strays" ]; then
  die "slurmctld/slurmd running without our pid files (pids $(echo $strays)); stop them first"
fi

# 3. munge: key once, daemon running
mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
[ -s /etc/munge/munge.key ] || mungekey -c -f -k /etc/munge/munge.key
chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge /run/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if id munge >/dev/null 2>&1; then
    su -s /bin/sh munge -c "munged --force" 2>/dev/null || munged --force
  else
    munged --force
  fi
  for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null 2>&1 || die "munged is not answering"
fi

# 4. node names resolve to this machine
for n in n1 n2; do
  grep -qE "^127\.0\.0\.1[[:space:]]+$n\$" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
done

# 5. config
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2/1024*0.9)}' /proc/meminfo)
mkdir -p "$conf_dir" "$log_dir" /var/spool/slurmctld /var/spool/slurmd/n1 /var/spool/slurmd/n2
cat > "$conf_dir/slurm.conf" <<CONF
# Written by .ci/slurm-up.sh: a two-node test cluster on one host ($host).
ClusterName=finetune-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd-%n.log
SlurmctldPort=6817
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
# generous timeouts: a loaded 2-core CI box must not mark nodes down
SlurmctldTimeout=300
SlurmdTimeout=300
MessageTimeout=60
BatchStartTimeout=120
KillWait=30
InactiveLimit=0
MinJobAge=3600
Waittime=0
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=$host Port=6818 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=$host Port=6819 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
# proctrack/linuxproc + task/none: no cgroups needed (slurm 22.05 has no CgroupPlugin=disabled)
rm -f "$conf_dir/cgroup.conf"

# 6. daemons (they daemonize themselves)
start_daemon() {  # slurmctld | n1 | n2
  case "$1" in
    slurmctld) slurmctld -c || die "slurmctld failed to start" ;;
    *) slurmd -N "$1" || die "slurmd -N $1 failed to start" ;;
  esac
}
pid_file() { [ "$1" = slurmctld ] && echo /run/slurmctld.pid || echo "/run/slurmd-$1.pid"; }
for d in slurmctld n1 n2; do start_daemon "$d"; done

# 7. wait for both nodes idle (bounded). A daemon that exits after daemonizing (a port still
# held, a config it rejects) is restarted once, then reported at once instead of at the deadline.
deadline=$((start_ts + timeout_s))
restarted=""
while :; do
  state=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
  if echo "$state" | grep -qx 'n1 idle' && echo "$state" | grep -qx 'n2 idle'; then break; fi
  for d in slurmctld n1 n2; do
    pf=$(pid_file "$d")
    if [ -f "$pf" ] && [ -z "$(alive "$(cat "$pf")")" ]; then
      case " $restarted " in *" $d "*) die "$d exited again after a restart" ;; esac
      echo "slurm-up: $d exited after starting; restarting it once" >&2
      rm -f "$pf"
      restarted="$restarted $d"
      sleep 1
      start_daemon "$d"
    fi
  done
  # nodes left drained/down by an earlier run: resume them
  for n in n1 n2; do
    echo "$state" | grep -qE "^$n (down|drain|drng|fail)" && scontrol update NodeName=$n State=RESUME 2>/dev/null || true
  done
  [ "$(date +%s)" -lt "$deadline" ] || die "nodes not idle after ${timeout_s}s; sinfo says: ${state:-<no answer>}"
  sleep 1
done
echo "slurm-up: cluster up (n1, n2 idle) in $(( $(date +%s) - start_ts ))s"
sinfo
