//! Reading sersync's XML as its parser did: elements with attributes and children, text
//! ignored, the file's declared encoding honoured, every error placed by line and
//! column.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use quick_xml::XmlVersion;

use super::ImportError;

/// One element: what sersync's XML parser gave it (attributes and children; text is
/// ignored, as sersync ignored it).
#[derive(Debug)]
pub(super) struct Node {
    pub(super) name: String,
    pub(super) attrs: Vec<(String, String)>,
    pub(super) children: Vec<Node>,
    pub(super) line: usize,
    pub(super) column: usize,
}

impl Node {
    pub(super) fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// The attribute, trimmed, when present and not empty.
    pub(super) fn value(&self, key: &str) -> Option<&str> {
        self.attr(key).map(str::trim).filter(|v| !v.is_empty())
    }

    // sersync's parser compared element and attribute names case-insensitively.
    pub(super) fn child(&self, name: &str) -> Option<&Node> {
        self.children
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
    }

    pub(super) fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children
            .iter()
            .filter(move |c| c.name.eq_ignore_ascii_case(name))
    }

    /// sersync compared with `"true"` exactly: anything else is off.
    pub(super) fn on(&self) -> bool {
        self.attr("start") == Some("true")
    }
}

/// Line and column (both 1-based, the column in characters) of a byte offset.
/// Deeper than any sersync file (it nests 4 levels): refused, not recursed into.
const MAX_DEPTH: usize = 64;

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

fn invalid(file: &str, text: &str, offset: usize, message: String) -> ImportError {
    let (line, column) = line_col(text, offset);
    ImportError::Invalid {
        file: file.to_string(),
        line,
        column,
        message,
    }
}

/// The document's root element, with every child; errors say where the XML breaks.
pub(super) fn parse(text: &str, file: &str) -> Result<Node, ImportError> {
    let err = |offset: usize, message: String| invalid(file, text, offset, message);
    let mut reader = Reader::from_str(text);
    let mut open: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    loop {
        let offset = reader.buffer_position() as usize;
        let event = reader.read_event().map_err(|e| {
            err(
                reader.error_position() as usize,
                format!("not well-formed XML: {e}"),
            )
        })?;
        let stray = match &event {
            Event::Text(t) => !t.trim_ascii().is_empty(),
            Event::CData(_) | Event::GeneralRef(_) => true,
            _ => false,
        };
        if stray && open.is_empty() {
            return Err(err(
                offset,
                "text outside any element: this is not an XML file".into(),
            ));
        }
        let done = match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let node = element(e, text, offset, &err)?;
                if matches!(event, Event::Start(_)) {
                    // sersync's own nesting is 4 deep; a pathological file must not
                    // exhaust the stack when the tree is dropped.
                    if open.len() >= MAX_DEPTH {
                        return Err(err(
                            offset,
                            format!("elements nested more than {MAX_DEPTH} deep"),
                        ));
                    }
                    open.push(node);
                    None
                } else {
                    Some(node)
                }
            }
            Event::End(_) => open.pop(),
            Event::Eof => {
                if let Some(n) = open.last() {
                    return Err(err(
                        text.len(),
                        format!(
                            "`<{}>` (line {}) is never closed: the file ends first",
                            n.name, n.line
                        ),
                    ));
                }
                return root.ok_or_else(|| {
                    err(
                        text.len(),
                        "no XML element at all: this is not a sersync config".into(),
                    )
                });
            }
            _ => None,
        };
        let Some(node) = done else { continue };
        match open.last_mut() {
            Some(parent) => parent.children.push(node),
            None if root.is_some() => {
                return Err(err(
                    offset,
                    format!(
                        "a second top-level element `<{}>` after `<{}>`",
                        node.name,
                        root.as_ref().map_or("", |r| r.name.as_str())
                    ),
                ));
            }
            None => root = Some(node),
        }
    }
}

fn element(
    e: &BytesStart,
    text: &str,
    offset: usize,
    err: &impl Fn(usize, String) -> ImportError,
) -> Result<Node, ImportError> {
    let name = e.name().as_ref().to_string();
    let mut attrs = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|x| err(offset, format!("bad attribute in `<{name}>`: {x}")))?;
        let key = a.key.as_ref().to_string();
        let value = a
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(|x| err(offset, format!("bad value of `{key}` in `<{name}>`: {x}")))?;
        attrs.push((key, value.into_owned()));
    }
    let (line, column) = line_col(text, offset);
    Ok(Node {
        name,
        attrs,
        children: Vec::new(),
        line,
        column,
    })
}

/// The encoding named in `<?xml … encoding="…"?>`, if any.
pub(super) fn declared_encoding(bytes: &[u8]) -> Option<String> {
    let decl = bytes.strip_prefix(b"<?xml")?;
    let decl = &decl[..decl.windows(2).position(|w| w == b"?>")?];
    let at = decl.windows(8).position(|w| w == b"encoding")?;
    let rest = &decl[at + 8..];
    let rest = rest
        .trim_ascii_start()
        .strip_prefix(b"=")?
        .trim_ascii_start();
    let quote = *rest.first()?;
    let rest = &rest[1..];
    let end = rest.iter().position(|&b| b == quote)?;
    Some(String::from_utf8_lossy(&rest[..end]).to_ascii_lowercase())
}
