//! A catalogue of malformed input to every front end of a read-only `sbmon serve` (and to
//! `sbmon call`), one table row per input with the answer it must get: JSON-RPC at `/rpc`,
//! MCP over Streamable HTTP and over stdio, raw HTTP (hostile Host and Origin, invalid UTF-8,
//! huge headers, URLs and bodies) and the CLI. After the whole table, the image is checked
//! unharmed: the same threads, its agent answers, no evaluation ran and no control changed it,
//! although its agent would serve both (only sbmon's read-only policy stands in between).
//!
//! `tests/security.rs` has the cross-site and rebinding requests on every endpoint, the id
//! echo and huge-echo cases of `/rpc`, and bad thread ids; they are not repeated here.

mod common;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Image, Sbmon, Setup};
use sbmon::tools::Allow;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Where a row's input goes.
enum Input {
    /// Raw bytes of one HTTP/1.1 request to `sbmon serve`.
    Http(Vec<u8>),
    /// One line to `sbmon serve --stdio`, after its MCP handshake.
    Stdio(Vec<u8>),
    /// Arguments of `sbmon call --target <the image>`.
    Cli(Vec<OsString>),
}

/// What a row must get: the HTTP status (or the CLI's exit code; for stdio 200 when anything
/// but the probe's reply came back, 0 when nothing did) and fragments of the answer.
struct Case {
    name: &'static str,
    input: Input,
    status: u16,
    says: Vec<&'static str>,
}

fn case(name: &'static str, input: Input, status: u16, says: &[&'static str]) -> Case {
    Case {
        name,
        input,
        status,
        says: says.to_vec(),
    }
}

/// An HTTP/1.1 request with `Host: 127.0.0.1:PORT` unless `headers` brings its own Host.
fn request(
    port: u16,
    method: &str,
    path: &[u8],
    headers: &[(&[u8], &[u8])],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(b"host")) {
        out.extend_from_slice(format!("Host: 127.0.0.1:{port}\r\n").as_bytes());
    }
    for (k, v) in headers {
        out.extend_from_slice(k);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(body);
    out
}

const JSON: (&[u8], &[u8]) = (b"Content-Type", b"application/json");
const MCP_ACCEPT: (&[u8], &[u8]) = (b"Accept", b"application/json, text/event-stream");

fn rpc(port: u16, body: impl AsRef<[u8]>) -> Input {
    Input::Http(request(port, "POST", b"/rpc", &[JSON], body.as_ref()))
}

fn rpc_call(port: u16, method: &str, params: Value) -> Input {
    rpc(
        port,
        json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).to_string(),
    )
}

fn get(port: u16, path: &[u8], headers: &[(&[u8], &[u8])]) -> Input {
    Input::Http(request(port, "GET", path, headers, b""))
}

fn mcp(port: u16, session: &str, body: impl AsRef<[u8]>) -> Input {
    let session = session.as_bytes();
    Input::Http(request(
        port,
        "POST",
        b"/mcp",
        &[JSON, MCP_ACCEPT, (b"Mcp-Session-Id", session)],
        body.as_ref(),
    ))
}

fn tools_call(id: u64, name: &str, arguments: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": name, "arguments": arguments}})
    .to_string()
}

fn stdio(line: impl AsRef<[u8]>) -> Input {
    Input::Stdio(line.as_ref().to_vec())
}

fn cli(args: &[&str]) -> Input {
    Input::Cli(args.iter().map(OsString::from).collect())
}

fn nested(open: &str, close: &str, depth: usize) -> String {
    open.repeat(depth) + &close.repeat(depth)
}

/// Send one raw request; the status and everything after the headers. A server that
/// refuses a large body may close before reading it, so a failed write is not an error.
async fn send_raw(port: u16, bytes: &[u8]) -> (u16, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let _ = stream.write_all(bytes).await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        answer
    };
    let answer = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("an answer within 30 s");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:.300}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// `sbmon serve --stdio` after its MCP handshake.
struct StdioServer {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl StdioServer {
    async fn start(image: &Image) -> StdioServer {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sbmon"))
            .args(["serve", "--stdio", "--target"])
            .arg(format!("app={}", image.sbcl.address))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start sbmon serve --stdio");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut server = StdioServer {
            child,
            stdin,
            lines,
        };
        let init = json!({"jsonrpc": "2.0", "id": "init", "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "bad_input", "version": "1"}}});
        server.write(init.to_string().as_bytes()).await;
        server.until_id(&json!("init")).await;
        server
            .write(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .await;
        server
    }

    async fn write(&mut self, line: &[u8]) {
        self.stdin.write_all(line).await.unwrap();
        self.stdin.write_all(b"\n").await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Lines up to and including the answer with id `id`.
    async fn until_id(&mut self, id: &Value) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
                .await
                .expect("an answer within 30 s")
                .unwrap()
                .expect("sbmon --stdio is still running");
            let value: Value = serde_json::from_str(&line).expect("stdout carries JSON only");
            let done = &value["id"] == id;
            seen.push(value);
            if done {
                return seen;
            }
        }
    }

    /// Send `line`, then a ping; everything answered up to the ping's answer (and, when
    /// `line` has an id, its own answer), without that of the ping. rmcp may answer a line
    /// it cannot read after the ping, so when an answer is `expected` this waits for one, and
    /// when none is, it listens a second longer for a stray one.
    async fn exchange(&mut self, line: &[u8], n: usize, expected: bool) -> Vec<Value> {
        let own_id = serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|v| v.get("id").cloned());
        self.write(line).await;
        let ping = json!(format!("ping-{n}"));
        self.write(
            json!({"jsonrpc": "2.0", "id": ping, "method": "ping"})
                .to_string()
                .as_bytes(),
        )
        .await;
        let mut seen = self.until_id(&ping).await;
        seen.pop();
        if let Some(id) = own_id
            && !seen.iter().any(|v| v["id"] == id)
        {
            seen.extend(self.until_id(&id).await);
        }
        let wait = if expected { 30 } else { 1 };
        while seen.is_empty() || !expected {
            match tokio::time::timeout(Duration::from_secs(wait), self.lines.next_line()).await {
                Ok(line) => {
                    let line = line.unwrap().expect("sbmon --stdio is still running");
                    seen.push(serde_json::from_str(&line).expect("stdout carries JSON only"));
                }
                Err(_) => {
                    assert!(!expected, "no answer within 30 s");
                    break;
                }
            }
        }
        seen
    }
}

/// A thread the policy must keep alive: `thread_kill` names it below.
const VICTIM: &str = "bad-input-victim";

#[tokio::test]
async fn every_malformed_input_gets_its_error_and_harms_nothing() {
    let image = Image::start(Setup {
        forms: vec![common::sleeper(VICTIM)],
        // The agent would evaluate and control: only sbmon's policy refuses.
        allow: Allow {
            control: true,
            eval: true,
        },
        ..Setup::default()
    })
    .await;
    let sbmon = Sbmon::serve(&image, &[]);
    let port: u16 = sbmon.base.rsplit(':').next().unwrap().parse().unwrap();
    let mut stdio_server = StdioServer::start(&image).await;
    let marker = image.dir.path().join("evaluated");
    let eval_code = format!(
        "(with-open-file (o {:?} :direction :output :if-exists :supersede) (write-line \"ran\" o))",
        marker.to_str().unwrap()
    );
    let client = image.client();
    let nursery = client.memory().await.unwrap().nursery_size;

    // An MCP session over HTTP for the rows that need one.
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "bad_input", "version": "1"}}})
    .to_string();
    let response = reqwest::Client::new()
        .post(format!("{}/mcp", sbmon.base))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(init)
        .send()
        .await
        .unwrap();
    let session = response.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    drop(response);
    let (status, _) = send_raw(
        port,
        &request(
            port,
            "POST",
            b"/mcp",
            &[JSON, MCP_ACCEPT, (b"Mcp-Session-Id", session.as_bytes())],
            br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        ),
    )
    .await;
    assert_eq!(status, 202);

    // Warm up every front end once, so the threads counted below include the connections of
    // the long-lived sbmon processes and the test's own client.
    assert!(
        sbmon
            .rpc(json!({"jsonrpc": "2.0", "id": 1, "method": "memory_stats"}))
            .await["result"]
            .is_object()
    );
    stdio_server
        .exchange(tools_call(1, "memory_stats", json!({})).as_bytes(), 0, true)
        .await;
    client.ping().await.unwrap();
    let threads_before = common::proc_tids(image.pid()).len();

    let huge = "h".repeat(900_000);
    let many_fields: serde_json::Map<String, Value> =
        (0..20_000).map(|i| (format!("f{i}"), json!(i))).collect();
    let eval_batch: Vec<Value> = (0..101)
        .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "repl_eval", "params": {"code": eval_code}}))
        .collect();
    let target = format!(
        "unix:{}",
        image.sbcl.address.to_string().trim_start_matches("unix:")
    );
    let p = port;
    let s = session.as_str();
    #[rustfmt::skip]
    let cases = vec![
        // JSON-RPC at /rpc: the envelope.
        case("rpc: truncated JSON", rpc(p, r#"{"jsonrpc":"#), 200, &["-32700", "parse error"]),
        case("rpc: empty body", rpc(p, ""), 200, &["-32700", "EOF"]),
        case("rpc: trailing garbage", rpc(p, r#"{"jsonrpc":"2.0","id":1,"method":"memory_stats"} x"#), 200, &["-32700", "trailing characters"]),
        case("rpc: invalid UTF-8", rpc(p, b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"\xff\xfe\"}"), 200, &["-32700", "invalid unicode"]),
        case("rpc: a bare number", rpc(p, "42"), 200, &["-32600", "a request must be an object"]),
        case("rpc: a bare string", rpc(p, r#""memory_stats""#), 200, &["-32600", "a request must be an object"]),
        case("rpc: empty batch", rpc(p, "[]"), 200, &["-32600", "empty batch"]),
        case("rpc: batch of 101 evaluations", rpc(p, Value::Array(eval_batch).to_string()), 200, &["-32600", "batch of 101 requests exceeds the limit of 100"]),
        case("rpc: batch of non-requests", rpc(p, r#"[1,"a",null]"#), 200, &["a request must be an object"]),
        case("rpc: jsonrpc 1.0", rpc(p, r#"{"jsonrpc":"1.0","id":1,"method":"memory_stats"}"#), 200, &["-32600", r#"\"jsonrpc\" must be \"2.0\""#]),
        case("rpc: jsonrpc missing", rpc(p, r#"{"id":1,"method":"memory_stats"}"#), 200, &["-32600", "jsonrpc"]),
        case("rpc: method missing", rpc(p, r#"{"jsonrpc":"2.0","id":1}"#), 200, &["-32600", "must be a tool name"]),
        case("rpc: method a number", rpc(p, r#"{"jsonrpc":"2.0","id":1,"method":42}"#), 200, &["-32600", "must be a tool name"]),
        case("rpc: method given twice", rpc(p, r#"{"jsonrpc":"2.0","id":1,"method":"memory_stats","method":"repl_eval"}"#), 200, &["-32600", "duplicate field `method`"]),
        case("rpc: id an object", rpc(p, r#"{"jsonrpc":"2.0","id":{"a":1},"method":"memory_stats"}"#), 200, &["-32600", "id must be a number or a string"]),
        case("rpc: id a boolean", rpc(p, r#"{"jsonrpc":"2.0","id":true,"method":"memory_stats"}"#), 200, &["-32600", "id must be a number or a string"]),
        case("rpc: params an array", rpc(p, r#"{"jsonrpc":"2.0","id":1,"method":"memory_stats","params":[1]}"#), 200, &["-32602", "params must be an object"]),
        case("rpc: params a string", rpc(p, r#"{"jsonrpc":"2.0","id":1,"method":"memory_stats","params":"x"}"#), 200, &["-32602", "params must be an object"]),
        case("rpc: lone surrogate in method", rpc(p, r#"{"jsonrpc":"2.0","id":1,"method":"\ud800"}"#), 200, &["-32600", "malformed request"]),
        case("rpc: NUL in the method", rpc(p, r#"{"jsonrpc":"2.0","id":1,"method":"memory_stats\u0000"}"#), 200, &["-32601", "unknown tool"]),
        case("rpc: params nested 200 deep", rpc(p, format!(r#"{{"jsonrpc":"2.0","id":1,"method":"memory_stats","params":{{"target":{}}}}}"#, nested("[", "]", 200))), 200, &["-32600", "recursion limit exceeded"]),
        case("rpc: a body nested 400,000 deep", rpc(p, nested("[", "]", 400_000)), 200, &["-32600", "a request must be an object"]),
        // JSON-RPC: the tools' arguments.
        case("rpc: unknown tool", rpc_call(p, "no_such_tool", json!({})), 200, &["-32601", "unknown tool"]),
        case("rpc: eval not offered", rpc_call(p, "repl_eval", json!({"code": eval_code})), 200, &["-32601", "--allow eval"]),
        case("rpc: system load not offered", rpc_call(p, "code_reload_system", json!({"system": "sb-posix"})), 200, &["-32601", "--allow eval"]),
        case("rpc: gc_tune not offered", rpc_call(p, "gc_tune", json!({"nursery_size_bytes": 1 << 20})), 200, &["-32601", "--allow control"]),
        case("rpc: thread_kill not offered", rpc_call(p, "thread_kill", json!({"thread_id": VICTIM})), 200, &["-32601", "--allow control"]),
        case("rpc: missing field", rpc_call(p, "thread_inspect", json!({})), 200, &["-32602", "missing field `thread_id`"]),
        case("rpc: negative count", rpc_call(p, "heap_histogram", json!({"top": -5})), 200, &["-32602", "expected u32"]),
        case("rpc: a string for a number", rpc_call(p, "thread_dump_all", json!({"max_frames": "lots"})), 200, &["-32602", "expected u32"]),
        case("rpc: out of range", rpc_call(p, "gc_watch", json!({"seconds": 1e9})), 200, &["-32602", "seconds must be 0.1..60"]),
        case("rpc: 20,000 unknown fields", rpc_call(p, "memory_stats", Value::Object(many_fields)), 200, &["-32602", "unknown field"]),
        case("rpc: a 900 kB unknown target, in a batch", rpc(p, json!([{"jsonrpc": "2.0", "id": 1, "method": "gc_stats", "params": {"target": huge}}]).to_string()), 200, &["unknown target", " chars)"]),
        // HTTP: hostile Host and Origin, broken requests, sizes.
        case("http: Host not UTF-8", get(p, b"/metrics", &[(b"Host", b"\xff\xfe:1")]), 403, &["Host header is not visible ASCII"]),
        case("http: two Host headers", get(p, b"/metrics", &[(b"Host", b"127.0.0.1"), (b"Host", b"evil.com")]), 403, &["more than one Host header"]),
        case("http: Host 127.0.0.1.evil.com", get(p, b"/metrics", &[(b"Host", b"127.0.0.1.evil.com")]), 403, &["not a loopback name"]),
        case("http: Host localhost.evil.com", get(p, b"/health", &[(b"Host", b"localhost.evil.com:80")]), 403, &["not a loopback name"]),
        case("http: Host with userinfo", get(p, b"/metrics", &[(b"Host", b"evil.com@127.0.0.1")]), 403, &["not a loopback name"]),
        case("http: Origin look-alike", Input::Http(request(p, "POST", b"/rpc", &[JSON, (b"Origin", b"http://localhost.evil.com")], b"{}")), 403, &["Origin \"http://localhost.evil.com\" is refused"]),
        case("http: Origin not UTF-8", Input::Http(request(p, "POST", b"/rpc", &[JSON, (b"Origin", b"http://\xff")], b"{}")), 403, &["is refused"]),
        case("http: Origin file://", Input::Http(request(p, "POST", b"/rpc", &[JSON, (b"Origin", b"file://")], b"{}")), 403, &["is refused"]),
        case("http: form-encoded /rpc", Input::Http(request(p, "POST", b"/rpc", &[(b"Content-Type", b"application/x-www-form-urlencoded")], b"a=1")), 415, &["Content-Type: application/json"]),
        case("http: GET /rpc", get(p, b"/rpc", &[]), 405, &[]),
        case("http: percent-encoded invalid UTF-8", get(p, b"/health/targets/%ff%fe", &[]), 400, &["Invalid UTF-8"]),
        case("http: raw bytes in the path", get(p, b"/health/targets/\xff", &[]), 400, &[]),
        case("http: a 100 kB URL", get(p, format!("/health/targets/{}", "a".repeat(100_000)).as_bytes(), &[]), 414, &[]),
        case("http: a 1 MB header", get(p, b"/metrics", &[(b"X-Big", "a".repeat(1_000_000).as_bytes())]), 431, &[]),
        case("http: 500 headers", Input::Http({
            let names: Vec<String> = (0..500).map(|i| format!("X-H{i}")).collect();
            let headers: Vec<(&[u8], &[u8])> = names.iter().map(|n| (n.as_bytes(), &b"v"[..])).collect();
            request(p, "GET", b"/metrics", &headers, b"")
        }), 431, &[]),
        case("http: a 3 MB /rpc body", rpc(p, format!("[{}1]", "1,".repeat(1_500_000))), 413, &["length limit exceeded"]),
        case("http: 2 MB chunked", Input::Http({
            let mut r = format!("POST /rpc HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").into_bytes();
            for _ in 0..2 { r.extend_from_slice(b"100000\r\n"); r.extend(std::iter::repeat_n(b'a', 0x100000)); r.extend_from_slice(b"\r\n"); }
            r.extend_from_slice(b"0\r\n\r\n");
            r
        }), 413, &["length limit exceeded"]),
        case("http: Content-Length not a number", Input::Http(format!("POST /rpc HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nContent-Type: application/json\r\nContent-Length: abc\r\nConnection: close\r\n\r\n{{}}").into_bytes()), 400, &[]),
        case("http: not HTTP at all", Input::Http(b"\x00\x01\x02 nonsense\r\n\r\n".to_vec()), 400, &[]),
        case("http: a negative journal limit", get(p, b"/monitoring/events?limit=-1", &[]), 400, &["limit", "use /monitoring/events?"]),
        case("http: an unknown operation, not UTF-8", get(p, b"/monitoring/operation?name=%ff", &[]), 404, &["no tool named"]),
        // MCP over Streamable HTTP.
        case("mcp-http: no Accept", Input::Http(request(p, "POST", b"/mcp", &[JSON], b"{}")), 406, &["must accept both"]),
        case("mcp-http: not JSON", mcp(p, s, "{bad"), 415, &["fail to deserialize"]),
        case("mcp-http: not a JSON-RPC message", mcp(p, s, "[1,2]"), 415, &["unrecognized JSON-RPC message"]),
        case("mcp-http: no session", Input::Http(request(p, "POST", b"/mcp", &[JSON, MCP_ACCEPT], tools_call(2, "memory_stats", json!({})).as_bytes())), 400, &["Session ID is required"]),
        case("mcp-http: unknown session", mcp(p, "no-such-session", tools_call(2, "memory_stats", json!({}))), 404, &["Session not found"]),
        case("mcp-http: unknown tool", mcp(p, s, tools_call(3, "no_such_tool", json!({}))), 200, &["-32602", "unknown tool"]),
        case("mcp-http: eval not offered", mcp(p, s, tools_call(4, "repl_eval", json!({"code": eval_code}))), 200, &["-32602", "--allow eval"]),
        case("mcp-http: control not offered", mcp(p, s, tools_call(5, "memory_gc", json!({}))), 200, &["-32602", "--allow control"]),
        case("mcp-http: unknown argument", mcp(p, s, tools_call(6, "memory_stats", json!({"bogus": 1}))), 200, &["\"isError\":true", "unknown field `bogus`"]),
        case("mcp-http: arguments not an object", mcp(p, s, r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"memory_stats","arguments":"x"}}"#), 200, &["-32601"]),
        case("mcp-http: unknown method", mcp(p, s, r#"{"jsonrpc":"2.0","id":9,"method":"no/such"}"#), 200, &["-32601", "no/such"]),
        case("mcp-http: a 2 MB body", mcp(p, s, tools_call(10, "memory_stats", json!({"target": "t".repeat(2_000_000)}))), 413, &["length limit exceeded"]),
        // MCP over stdio: the session survives every line.
        // rmcp's stdio transport skips a line that is not JSON (no -32700 answer, even when
        // the line had an id): what matters is that the session goes on, which the ping after
        // every row shows. JSON that is not a message gets -32600.
        case("mcp-stdio: not JSON (skipped)", stdio("{bad json"), 0, &[]),
        case("mcp-stdio: an empty batch", stdio("[]"), 200, &["-32600", "Invalid request"]),
        case("mcp-stdio: a bare string", stdio(r#""tools/call""#), 200, &["-32600", "Invalid request"]),
        case("mcp-stdio: a line not UTF-8 (skipped)", stdio(b"\xff\xfe{}"), 0, &[]),
        case("mcp-stdio: unknown tool", stdio(tools_call(11, "no_such_tool", json!({}))), 200, &["-32602", "unknown tool"]),
        case("mcp-stdio: eval not offered", stdio(tools_call(12, "repl_eval", json!({"code": eval_code}))), 200, &["-32602", "--allow eval"]),
        case("mcp-stdio: thread_kill not offered", stdio(tools_call(13, "thread_kill", json!({"thread_id": VICTIM}))), 200, &["-32602", "--allow control"]),
        case("mcp-stdio: a 3 MB unknown target", stdio(tools_call(14, "memory_stats", json!({"target": "x".repeat(3_000_000)}))), 200, &["unknown target", " chars)"]),
        case("mcp-stdio: arguments nested 10,000 deep (skipped)", stdio(format!(r#"{{"jsonrpc":"2.0","id":15,"method":"tools/call","params":{{"name":"memory_stats","arguments":{}}}}}"#, nested("[", "]", 10_000))), 0, &[]),
        // sbmon call.
        case("cli: unknown tool", cli(&["no_such_tool"]), 2, &["unknown tool \"no_such_tool\""]),
        case("cli: arguments not JSON", cli(&["memory_stats", "{bad"]), 2, &["arguments are not valid JSON"]),
        case("cli: arguments an array", cli(&["memory_stats", "[1]"]), 2, &["arguments must be a JSON object"]),
        case("cli: unknown field", cli(&["memory_stats", r#"{"bogus":1}"#]), 2, &["unknown field `bogus`"]),
        case("cli: missing field", cli(&["thread_inspect", "{}"]), 2, &["missing field `thread_id`"]),
        case("cli: wrong type", cli(&["thread_inspect", r#"{"thread_id":{"a":1}}"#]), 2, &["expected an OS tid (integer) or a thread name"]),
        case("cli: eval not offered", cli(&["repl_eval", &json!({"code": eval_code}).to_string()]), 2, &["--allow eval"]),
        case("cli: control not offered", cli(&["memory_gc", "{}"]), 2, &["--allow control"]),
        case("cli: arguments nested 5,000 deep", cli(&["memory_stats", &nested("[", "]", 5_000)]), 2, &["recursion limit exceeded"]),
        case("cli: an argument not UTF-8", Input::Cli(vec![OsString::from_vec(b"\xff\xfe".to_vec())]), 2, &["invalid UTF-8"]),
        case("cli: a timeout not a number", cli(&["--timeout", "soon", "memory_stats"]), 2, &["invalid value 'soon'"]),
        case("cli: an unknown target scheme", cli(&["--target", "foo:bar", "memory_stats"]), 2, &["unknown scheme"]),
        case("cli: a pid not a number", cli(&["--target", "pid:abc", "memory_stats"]), 2, &["pid is not a number"]),
        case("cli: no socket there", cli(&["--target", "unix:/nonexistent/agent.sock", "memory_stats"]), 1, &["cannot connect to the agent", "No such file"]),
        case("cli: a 100 kB target name", cli(&["gc_stats", &json!({"target": "n".repeat(100_000)}).to_string()]), 1, &["unknown target", " chars)"]),
    ];
    assert!(cases.len() >= 40);

    let mut wrong = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        let (status, text) = match &case.input {
            Input::Http(bytes) => send_raw(port, bytes).await,
            Input::Stdio(line) => {
                let answers = stdio_server.exchange(line, n + 1, case.status != 0).await;
                let status = if answers.is_empty() { 0 } else { 200 };
                (status, Value::Array(answers).to_string())
            }
            Input::Cli(args) => {
                let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sbmon"));
                command.arg("call");
                // The row's own --target, or the image.
                if !args.iter().any(|a| a == "--target") {
                    command.args(["--target", &target]);
                }
                let out = command.args(args).output().await.expect("run sbmon call");
                let text = format!("{}{}", common::text(&out.stdout), common::text(&out.stderr));
                (out.status.code().unwrap_or(-1) as u16, text)
            }
        };
        let missing: Vec<_> = case.says.iter().filter(|f| !text.contains(**f)).collect();
        // Whatever the input, the answer is bounded: echoed input is clipped.
        let bounded = text.len() < 16_000;
        if status != case.status || !missing.is_empty() || !bounded {
            wrong.push(format!(
                "{}: expected {} saying {:?}, got {status} ({} bytes): {text:.400}",
                case.name,
                case.status,
                case.says,
                text.len()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} rows wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    println!(
        "{} malformed inputs, each answered as expected",
        cases.len()
    );

    // The image is unharmed: its agent answers, nothing was evaluated or changed, and once the
    // CLI's connections have closed it has the same threads as before.
    client.ping().await.expect("the agent still answers");
    assert!(!marker.exists(), "an evaluation ran");
    assert_eq!(
        client.memory().await.unwrap().nursery_size,
        nursery,
        "gc_tune ran"
    );
    let threads = client.threads().await.unwrap();
    assert!(
        threads.iter().any(|t| t.name.as_deref() == Some(VICTIM)),
        "thread_kill ran"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = common::proc_tids(image.pid()).len();
        if now == threads_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{threads_before} threads before, {now} after"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And both long-lived sbmon processes still serve.
    assert_eq!(sbmon.get("/health/live").await.0, 200);
    assert!(
        sbmon
            .rpc(json!({"jsonrpc": "2.0", "id": 1, "method": "memory_stats"}))
            .await["result"]
            .is_object()
    );
    let answer = stdio_server
        .exchange(
            tools_call(99, "memory_stats", json!({})).as_bytes(),
            999,
            true,
        )
        .await;
    assert!(
        answer
            .iter()
            .any(|a| a["result"]["structuredContent"].is_object()),
        "{answer:?}"
    );
    stdio_server.child.kill().await.unwrap();
}
