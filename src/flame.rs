//! Rendering of stack profiles for people and their tools: folded stacks (`a;b;c N`, what
//! flame graph tools read), speedscope's JSON file format (a "sampled" profile), and an
//! interactive SVG flame graph (inferno), also differential (two folded profiles).
//!
//! A leaf: it knows stacks as root-first frame names with a sample count, nothing of agents
//! or tools.

use std::collections::HashMap;
use std::io;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// speedscope's file format schema, the value its files carry in `$schema`.
pub const SPEEDSCOPE_SCHEMA: &str = "https://www.speedscope.app/file-format-schema.json";

/// Most lines a folded file may have to be read (`--diff BASE.folded`): a profile has at
/// most the agent's 1000 distinct stacks plus one, so this is far above any sbmon wrote.
pub const MAX_FOLDED_LINES: usize = 100_000;

/// One distinct stack and how many samples had it: the folded form, frames joined by `;`,
/// root first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FoldedStack {
    /// Root first, frames joined by `;` (a `;` inside a frame name is written `,`).
    pub stack: String,
    pub samples: u64,
}

/// A frame name as one folded field: no `;` (the separator) and no newline.
pub fn frame_field(name: &str) -> String {
    name.replace(';', ",").replace(['\n', '\r'], " ")
}

/// `frames` (root first) as one folded stack.
pub fn fold<'a>(frames: impl IntoIterator<Item = &'a str>) -> String {
    frames
        .into_iter()
        .map(frame_field)
        .collect::<Vec<_>>()
        .join(";")
}

/// The folded text: one `stack count` line per stack (empty stacks, which flame graphs cannot
/// draw, are written as the frame `[no frames]`).
pub fn folded_text(stacks: &[FoldedStack]) -> String {
    let mut out = String::new();
    for s in stacks {
        let stack = if s.stack.is_empty() {
            "[no frames]"
        } else {
            &s.stack
        };
        out.push_str(stack);
        out.push(' ');
        out.push_str(&s.samples.to_string());
        out.push('\n');
    }
    out
}

/// Read folded text back: `stack count` lines (blank lines skipped), at most
/// [`MAX_FOLDED_LINES`]. Errors name the line.
pub fn parse_folded(text: &str) -> Result<Vec<FoldedStack>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if out.len() == MAX_FOLDED_LINES {
            return Err(format!("more than {MAX_FOLDED_LINES} stacks"));
        }
        let (stack, count) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("line {}: not `stack count`", n + 1))?;
        let samples = count
            .parse()
            .map_err(|_| format!("line {}: {count:?} is not a sample count", n + 1))?;
        out.push(FoldedStack {
            stack: stack.to_string(),
            samples,
        });
    }
    Ok(out)
}

/// A speedscope file holding one sampled profile: each distinct stack is one sample whose
/// weight is its sample count, in unit `none` (counts, not time).
pub fn speedscope(name: &str, stacks: &[FoldedStack]) -> Value {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut frames: Vec<Value> = Vec::new();
    let mut samples: Vec<Vec<usize>> = Vec::with_capacity(stacks.len());
    let mut weights: Vec<u64> = Vec::with_capacity(stacks.len());
    for s in stacks {
        let sample = s
            .stack
            .split(';')
            .filter(|f| !f.is_empty())
            .map(|f| {
                *index.entry(f).or_insert_with(|| {
                    frames.push(json!({ "name": f }));
                    frames.len() - 1
                })
            })
            .collect();
        samples.push(sample);
        weights.push(s.samples);
    }
    let total: u64 = weights.iter().sum();
    json!({
        "$schema": SPEEDSCOPE_SCHEMA,
        "name": name,
        "exporter": concat!("sbmon ", env!("CARGO_PKG_VERSION")),
        "activeProfileIndex": 0,
        "shared": { "frames": frames },
        "profiles": [{
            "type": "sampled",
            "name": name,
            "unit": "none",
            "startValue": 0,
            "endValue": total,
            "samples": samples,
            "weights": weights,
        }],
    })
}

fn options<'a>(title: &str, count_name: &str) -> inferno::flamegraph::Options<'a> {
    let mut opt = inferno::flamegraph::Options::default();
    opt.title = title.to_string();
    opt.count_name = count_name.to_string();
    opt.hash = true;
    opt.deterministic = true;
    opt
}

/// An interactive SVG flame graph of `stacks`.
pub fn svg(title: &str, count_name: &str, stacks: &[FoldedStack]) -> io::Result<Vec<u8>> {
    let text = folded_text(stacks);
    let mut out = Vec::new();
    inferno::flamegraph::from_lines(&mut options(title, count_name), text.lines(), &mut out)?;
    Ok(out)
}

/// A differential flame graph: the shape of `after`, coloured by the change from `before`
/// (red grew, blue shrank), with counts normalized so profiles of different lengths compare.
pub fn diff_svg(
    title: &str,
    count_name: &str,
    before: &[FoldedStack],
    after: &[FoldedStack],
) -> io::Result<Vec<u8>> {
    let mut lines = Vec::new();
    let opt = inferno::differential::Options {
        normalize: true,
        ..Default::default()
    };
    inferno::differential::from_readers(
        opt,
        folded_text(before).as_bytes(),
        folded_text(after).as_bytes(),
        &mut lines,
    )?;
    let text = String::from_utf8_lossy(&lines);
    let mut out = Vec::new();
    inferno::flamegraph::from_lines(&mut options(title, count_name), text.lines(), &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stacks() -> Vec<FoldedStack> {
        vec![
            FoldedStack {
                stack: "MAIN;WORK;HOT".into(),
                samples: 7,
            },
            FoldedStack {
                stack: "MAIN;IDLE".into(),
                samples: 3,
            },
        ]
    }

    #[test]
    fn folded_text_reads_back() {
        let text = folded_text(&stacks());
        assert_eq!(text, "MAIN;WORK;HOT 7\nMAIN;IDLE 3\n");
        assert_eq!(parse_folded(&text).unwrap(), stacks());
        assert!(parse_folded("A;B x").unwrap_err().contains("line 1"));
        assert_eq!(fold(["(SETF FOO)", "a;b"]), "(SETF FOO);a,b");
    }

    #[test]
    fn speedscope_indexes_shared_frames() {
        let file = speedscope("test", &stacks());
        assert_eq!(file["shared"]["frames"].as_array().unwrap().len(), 4);
        assert_eq!(file["profiles"][0]["samples"], json!([[0, 1, 2], [0, 3]]));
        assert_eq!(file["profiles"][0]["endValue"], 10);
    }

    #[test]
    fn svg_names_the_frames() {
        let svg = String::from_utf8(svg("t", "samples", &stacks()).unwrap()).unwrap();
        assert!(svg.contains("HOT") && svg.contains("IDLE"));
        let diff = diff_svg("d", "samples", &stacks(), &stacks()[..1]).unwrap();
        assert!(String::from_utf8(diff).unwrap().contains("HOT"));
    }
}
