#!/usr/bin/env bash
# One node of an engine spread over several machines, on vLLM's own multiprocessing executor (no
# Ray: vLLM refuses it on CPU). Run it on every machine, node 0 last or first (each waits up to
# vLLM's start-up timeouts for the others):
#
#   MASTER_ADDR=10.0.0.1 THIS_ADDR=10.0.0.1 examples/multinode.sh 0 /weights/ERNIE-4.5-21B-A3B-PT
#   MASTER_ADDR=10.0.0.1 THIS_ADDR=10.0.0.2 examples/multinode.sh 1 /weights/ERNIE-4.5-21B-A3B-PT
#
# Node 0 serves the OpenAI API on THIS_ADDR:PORT; the others run headless. Settings (environment):
#   MASTER_ADDR  node 0's address (required)          THIS_ADDR  this machine's address (required)
#   NNODES       machines (2)                          TP         ranks over all machines (4)
#   MASTER_PORT  node 0's rendezvous port (29555)      PORT       the API port on node 0 (8000)
#   GLOO_SOCKET_IFNAME  the interface holding THIS_ADDR (found from THIS_ADDR when unset)
# Every machine gets the same model files, TP, NNODES and extra arguments; arguments after MODEL go
# to `vllm serve` (e.g. --dtype bfloat16 --max-model-len 4096). After loading, the ranks compare what
# they loaded and refuse to start, naming the node, when a node's weights, dtype or quantization
# differ. Ranks wait for each other up to VLLM_ERNIE_MOE_NODE_TIMEOUT seconds (900) at start and
# in every collective, unless --distributed-timeout-seconds is given. On CPU with more than one rank per
# machine, give each rank its cores, e.g. VLLM_CPU_OMP_THREADS_BIND="0-27|28-55" (see
# docs/multinode.md). The machines must reach each other on MASTER_PORT and on the ports vLLM opens
# on THIS_ADDR for its message queues.
set -euo pipefail
usage="usage: MASTER_ADDR=A THIS_ADDR=B $0 NODE_RANK MODEL [vllm serve arguments]"
node_rank=${1:?$usage}
model=${2:?$usage}
shift 2
: "${MASTER_ADDR:?$usage (MASTER_ADDR: node 0's address)}"
: "${THIS_ADDR:?$usage (THIS_ADDR: this machine's address)}"
# The address vLLM advertises to the other nodes for its message queues, and the interface that
# holds it for torch's gloo (else gloo takes the host name's address, often 127.0.0.1).
export VLLM_HOST_IP="$THIS_ADDR"
if [ -z "${GLOO_SOCKET_IFNAME:-}" ]; then
    GLOO_SOCKET_IFNAME=$(ip -o -4 addr show | awk -v a="$THIS_ADDR" 'index($4, a "/") == 1 {print $2}')
    : "${GLOO_SOCKET_IFNAME:?no interface of this machine has THIS_ADDR=$THIS_ADDR}"
    export GLOO_SOCKET_IFNAME
fi
export VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}"
vllm=${VLLM_CLI:-vllm}
node=(serve "$model" --tensor-parallel-size "${TP:-4}" --nnodes "${NNODES:-2}"
      --node-rank "$node_rank" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29555}")
if [ "$node_rank" = 0 ]; then
    exec "$vllm" "${node[@]}" --host "$THIS_ADDR" --port "${PORT:-8000}" "$@"
else
    exec "$vllm" "${node[@]}" --headless "$@"
fi
