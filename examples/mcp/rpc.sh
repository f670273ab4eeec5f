#!/usr/bin/env bash
# Scripted use of sbmon's JSON-RPC endpoint. Start the server first:
#   sbmon serve            # HTTP on 127.0.0.1:9405, watching every agent in the runtime dir
set -euo pipefail
url=${SBMON_URL:-http://127.0.0.1:9405/rpc}

# One call: method = tool name, params = its arguments.
curl -s "$url" -d '{"jsonrpc":"2.0","id":1,"method":"health_check"}'
echo

# A batch, answered in one response; with several images, name one with "target".
curl -s "$url" -d '[
  {"jsonrpc":"2.0","id":"mem","method":"memory_stats"},
  {"jsonrpc":"2.0","id":"gc","method":"gc_stats"},
  {"jsonrpc":"2.0","id":"w1","method":"thread_inspect","params":{"thread_id":"worker-1","max_frames":10}}
]'
echo
