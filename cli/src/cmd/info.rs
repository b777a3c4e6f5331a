//! `ringblk info`: what an image is, in qemu-img's human layout or as QAPI
//! ImageInfo JSON (same keys and nesting as qemu-img's).

use std::sync::Arc;

use clap::Args;
use engine::block::BlockNode;
use engine::error::Result;
use engine::size::human_size;
use serde_json::{json, Map, Value};

use crate::common::{self, OutputFormat};
use crate::OpenArgs;

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    open: OpenArgs,
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Also show the images of the backing chain
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    filename: String,
}

/// QAPI ImageInfo of a node and its children.
pub async fn image_info(node: &Arc<dyn BlockNode>) -> Result<Value> {
    let mut children = Vec::new();
    // The backing image is shown as backing-filename, not as a child; qemu-img
    // does not list an external data file either.
    for c in node.children().into_iter().filter(|c| c.role == "file") {
        let info = Box::pin(image_info(&c.node)).await?;
        children.push(json!({ "name": c.role, "info": info }));
    }
    // Keys in qemu-img's order.
    let mut m = Map::new();
    m.insert("children".into(), Value::Array(children));
    let backing = node.backing_name();
    if let Some((_, Some(fmt))) = &backing {
        m.insert("backing-filename-format".into(), json!(fmt));
    }
    m.insert("virtual-size".into(), json!(node.size()));
    m.insert("filename".into(), json!(node.filename()));
    if let Some(cs) = node.cluster_size() {
        m.insert("cluster-size".into(), json!(cs));
    }
    m.insert("format".into(), json!(node.driver()));
    if let Some(a) = node.allocated_size().await? {
        m.insert("actual-size".into(), json!(a));
    }
    if let Some(fs) = node.format_specific() {
        m.insert("format-specific".into(), fs);
    }
    if let Some((name, _)) = &backing {
        m.insert("full-backing-filename".into(), json!(engine::block::resolve_relative(&node.filename(), name)));
        m.insert("backing-filename".into(), json!(name));
    }
    m.insert("dirty-flag".into(), json!(node.dirty()));
    Ok(Value::Object(m))
}

fn print_human(info: &Value, out: &mut String) {
    let size = info["virtual-size"].as_u64().unwrap_or(0);
    out.push_str(&format!("image: {}\n", info["filename"].as_str().unwrap_or("")));
    out.push_str(&format!("file format: {}\n", info["format"].as_str().unwrap_or("")));
    out.push_str(&format!("virtual size: {} ({size} bytes)\n", human_size(size)));
    out.push_str(&format!("disk size: {}\n", disk_size(info)));
    if let Some(cs) = info.get("cluster-size").and_then(Value::as_u64) {
        out.push_str(&format!("cluster_size: {cs}\n"));
    }
    if let Some(b) = info.get("backing-filename").and_then(Value::as_str) {
        let full = info.get("full-backing-filename").and_then(Value::as_str).unwrap_or(b);
        if full != b {
            out.push_str(&format!("backing file: {b} (actual path: {full})\n"));
        } else {
            out.push_str(&format!("backing file: {b}\n"));
        }
        if let Some(f) = info.get("backing-filename-format").and_then(Value::as_str) {
            out.push_str(&format!("backing file format: {f}\n"));
        }
    }
    if info.get("dirty-flag").and_then(Value::as_bool) == Some(true) {
        out.push_str("cleanly shut down: no\n");
    }
    if let Some(data) = info.pointer("/format-specific/data").and_then(Value::as_object) {
        if !data.is_empty() && info["format"] != "file" && info["format"] != "host_device" {
            out.push_str("Format specific information:\n");
            for (k, v) in data {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out.push_str(&format!("    {}: {v}\n", k.replace('-', " ")));
            }
        }
    }
    print_children(info, "", 0, out);
}

fn disk_size(info: &Value) -> String {
    info.get("actual-size").and_then(Value::as_u64).map_or_else(|| "unavailable".to_string(), human_size)
}

fn print_children(info: &Value, path: &str, depth: usize, out: &mut String) {
    let Some(children) = info["children"].as_array() else { return };
    for c in children {
        let name = c["name"].as_str().unwrap_or("");
        let ci = &c["info"];
        let indent = "    ".repeat(depth);
        let p = format!("{path}/{name}");
        out.push_str(&format!("{indent}Child node '{p}':\n"));
        let ind = "    ".repeat(depth + 1);
        let size = ci["virtual-size"].as_u64().unwrap_or(0);
        out.push_str(&format!("{ind}filename: {}\n", ci["filename"].as_str().unwrap_or("")));
        if ci["children"].as_array().is_none_or(Vec::is_empty) {
            out.push_str(&format!("{ind}protocol type: {}\n", ci["format"].as_str().unwrap_or("")));
            out.push_str(&format!("{ind}file length: {} ({size} bytes)\n", human_size(size)));
        } else {
            out.push_str(&format!("{ind}file format: {}\n", ci["format"].as_str().unwrap_or("")));
            out.push_str(&format!("{ind}virtual size: {} ({size} bytes)\n", human_size(size)));
        }
        out.push_str(&format!("{ind}disk size: {}\n", disk_size(ci)));
        print_children(ci, &p, depth + 1, out);
    }
}

pub fn run(a: InfoArgs) -> i32 {
    let spec = match common::spec(&a.open, &a.filename) {
        Ok(s) => s,
        Err(e) => return common::fail(e),
    };
    let rt = match common::small_runtime() {
        Ok(r) => r,
        Err(e) => return common::fail(e),
    };
    let mut flags = common::flags(&a.open, false);
    flags.no_io = true;
    let chain = a.backing_chain;
    let r = rt.block_on(move || async move {
        let node = common::open(spec, flags).await?;
        // With --backing-chain, every image down the chain, top first.
        let mut out = vec![image_info(&node).await?];
        let mut cur = engine::block::backing_of(&*node);
        while let (true, Some(n)) = (chain, cur) {
            out.push(image_info(&n).await?);
            cur = engine::block::backing_of(&*n);
        }
        Ok::<_, engine::Error>(out)
    });
    let infos = match r {
        Ok(i) => i,
        Err(e) => return common::fail(e),
    };
    match (a.output, a.backing_chain) {
        (OutputFormat::Json, false) => println!("{}", to_qemu_json(&infos[0])),
        (OutputFormat::Json, true) => println!("{}", to_qemu_json(&Value::Array(infos))),
        (OutputFormat::Human, _) => {
            let parts: Vec<String> = infos
                .iter()
                .map(|i| {
                    let mut s = String::new();
                    print_human(i, &mut s);
                    s
                })
                .collect();
            print!("{}", parts.join("\n"));
        }
    }
    0
}

/// JSON pretty-printed the way QEMU's QObject printer does: 4-space indent and
/// empty containers written as "[\n<indent>]" / "{\n<indent>}".
pub fn to_qemu_json(v: &Value) -> String {
    let mut s = String::new();
    write_json(v, 0, &mut s);
    s
}

fn write_json(v: &Value, depth: usize, s: &mut String) {
    let ind = "    ".repeat(depth + 1);
    let end = "    ".repeat(depth);
    match v {
        Value::Array(a) => {
            s.push_str("[\n");
            for (i, x) in a.iter().enumerate() {
                s.push_str(&ind);
                write_json(x, depth + 1, s);
                if i + 1 < a.len() {
                    s.push(',');
                }
                s.push('\n');
            }
            s.push_str(&end);
            s.push(']');
        }
        Value::Object(o) => {
            s.push_str("{\n");
            for (i, (k, x)) in o.iter().enumerate() {
                s.push_str(&ind);
                s.push_str(&serde_json::to_string(k).expect("string serialises"));
                s.push_str(": ");
                write_json(x, depth + 1, s);
                if i + 1 < o.len() {
                    s.push(',');
                }
                s.push('\n');
            }
            s.push_str(&end);
            s.push('}');
        }
        other => s.push_str(&other.to_string()),
    }
}
