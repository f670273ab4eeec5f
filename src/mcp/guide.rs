//! The MCP resource `sbmon://guide`: every tool the catalog offers, with its class,
//! description and arguments (generated from the schemas), and how targets and threads are
//! named.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde_json::Value;

use crate::tools::Catalog;

/// `sbmon://guide`: the tools as the catalog describes them (so it never drifts from what
/// tools/list says), and how threads and targets are named.
pub(super) fn guide(catalog: &Catalog) -> String {
    let mut out = String::from(
        "# sbmon tool guide\n\n\
         sbmon reads live SBCL images through an agent inside each image, plus what Linux \
         /proc says about the process. Start with `health_check`; the prompts \
         (basic_health_check, memory_investigation, gc_pressure, thread_health, \
         incident_response) walk through the usual investigations.\n\n\
         ## Naming\n\n\
         - **Targets**: every tool takes an optional `target`, the name of a watched image as \
         listed by the `sbmon://targets` resource (`NAME` from `--target NAME=SPEC`, or \
         `pid-N` for an agent found in the runtime directory). It is needed only when sbmon \
         watches several images.\n\
         - **Threads**: a thread is named by its OS tid (a number, as in `thread_list` and \
         /proc/PID/task) or by its name (a string). A name held by several threads is an \
         error that lists their tids; pass a tid then.\n\
         - Argument names are snake_case; hyphenated spellings (`thread-id`, `max-frames`) \
         are accepted too. Unknown arguments are refused.\n\
         - Classes: `read` tools only read; `control` and `eval` tools change the image and \
         exist only when sbmon was started with `--allow control` / `--allow eval`.\n\n\
         ## Tools\n",
    );
    for def in catalog.tools() {
        let class = def.class.name();
        let _ = write!(
            out,
            "\n### `{}`: {} ({class})\n\n{}\n",
            def.name, def.title, def.description
        );
        let schema = (def.input_schema)();
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            out.push_str("\nArguments:\n");
            for (name, prop) in props {
                let _ = write!(
                    out,
                    "\n- `{name}` ({}{}){}",
                    schema_type(prop, &schema),
                    if required.contains(&name.as_str()) {
                        ", required"
                    } else {
                        ""
                    },
                    prop.get("description")
                        .and_then(Value::as_str)
                        .map_or(Cow::Borrowed(""), |d| Cow::Owned(format!(": {d}"))),
                );
            }
            out.push('\n');
        }
    }
    out
}

/// A short type for a property schema: `string`, `integer or null`, `integer or string`.
fn schema_type(prop: &Value, root: &Value) -> String {
    // Follow a local `$ref` (schemars puts enums such as the thread id in `$defs`).
    let resolved = prop
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/"))
        .and_then(|path| path.split('/').try_fold(root, |node, key| node.get(key)))
        .unwrap_or(prop);
    let mut types: Vec<String> = Vec::new();
    match resolved.get("type") {
        Some(Value::String(t)) => types.push(t.clone()),
        Some(Value::Array(ts)) => {
            types.extend(ts.iter().filter_map(Value::as_str).map(String::from))
        }
        _ => {}
    }
    for key in ["anyOf", "oneOf"] {
        for alt in resolved
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let t = schema_type(alt, root);
            if !types.contains(&t) {
                types.push(t);
            }
        }
    }
    if types.is_empty() {
        "any".into()
    } else {
        types.join(" or ")
    }
}
