//! The conversation a chat template sees, built from the request's OpenAI `messages` as vLLM
//! builds it (`_parse_chat_message_content`, `_postprocess_messages`, and the developer-role
//! fallback of `safe_apply_chat_template`):
//!
//! - each message becomes `{role, content}`, then `tool_calls` and `reasoning` /
//!   `reasoning_content` (assistant), `tool_call_id` (tool), `name`; other keys are dropped;
//! - content is shaped for the template: a string (text parts joined with newlines) or a list
//!   of `{type: text, text}` parts, see [`ContentFormat`]; a tool message's text parts are always
//!   joined into a string;
//! - an assistant's tool call `arguments`, a JSON string in OpenAI's API, reach the template as
//!   a mapping (`{}` when absent, empty, malformed or not an object); an empty `tool_calls` list
//!   is dropped;
//! - when the template never mentions the `developer` role, developer messages become system
//!   messages, and several system messages are merged into one at the start.
//!
//! Values are minijinja's, with key order kept, so that `tojson` writes what Python would.

use minijinja::value::ValueKind;
use minijinja::Value;

use crate::chat::ContentFormat;
use crate::FrontendError;

/// The conversation for `messages` (the request's array, each an object).
pub(crate) fn conversation(
    messages: &[Value],
    format: ContentFormat,
    template_knows_developer: bool,
) -> Result<Vec<Value>, FrontendError> {
    let mut conversation = messages
        .iter()
        .map(|m| conversation_message(m, format))
        .collect::<Result<Vec<_>, _>>()?;
    let has_developer = conversation.iter().any(|m| role(m) == "developer");
    if has_developer && !template_knows_developer {
        conversation = developer_as_system(conversation);
    }
    Ok(conversation)
}

fn role(message: &Value) -> String {
    message
        .get_attr("role")
        .map(|r| r.to_string())
        .unwrap_or_default()
}

fn invalid(why: impl Into<String>) -> FrontendError {
    FrontendError::InvalidMessage(why.into())
}

fn field(message: &Value, key: &str) -> Option<Value> {
    message
        .get_attr(key)
        .ok()
        .filter(|v| !v.is_undefined() && !v.is_none())
}

fn conversation_message(message: &Value, format: ContentFormat) -> Result<Value, FrontendError> {
    if message.kind() != ValueKind::Map {
        return Err(invalid("a message must be an object"));
    }
    let role = field(message, "role")
        .filter(|r| r.kind() == ValueKind::String)
        .ok_or_else(|| invalid("a message needs a string role"))?;
    let texts = content_texts(field(message, "content"))?;
    let content = if role.as_str() == Some("tool") || format == ContentFormat::String {
        Value::from(texts.join("\n"))
    } else {
        Value::from(texts.into_iter().map(text_part).collect::<Vec<_>>())
    };

    let mut fields: Vec<(&str, Value)> = vec![("role", role.clone()), ("content", content)];
    match role.as_str() {
        Some("assistant") => {
            if let Some(calls) = field(message, "tool_calls") {
                if let Some(calls) = tool_calls(calls)? {
                    fields.push(("tool_calls", calls));
                }
            }
            if let Some(reasoning) = field(message, "reasoning") {
                fields.push(("reasoning", reasoning.clone()));
                fields.push(("reasoning_content", reasoning));
            }
        }
        Some("tool") => {
            if let Some(id) = message
                .get_attr("tool_call_id")
                .ok()
                .filter(|v| !v.is_undefined())
            {
                fields.push(("tool_call_id", id));
            }
        }
        _ => {}
    }
    if let Some(name) = field(message, "name").filter(|n| n.kind() == ValueKind::String) {
        fields.push(("name", name));
    }
    Ok(Value::from_iter(fields))
}

/// The texts of a message's content: a string, or a list of text parts (or bare strings).
fn content_texts(content: Option<Value>) -> Result<Vec<String>, FrontendError> {
    let Some(content) = content else {
        return Ok(Vec::new());
    };
    match content.kind() {
        ValueKind::String => Ok(vec![content.to_string()]),
        ValueKind::Seq => content
            .try_iter()
            .into_iter()
            .flatten()
            .map(|part| {
                if part.kind() == ValueKind::String {
                    return Ok(part.to_string());
                }
                let kind = field(&part, "type").map(|t| t.to_string());
                match (kind.as_deref(), field(&part, "text")) {
                    (Some("text"), Some(text)) if text.kind() == ValueKind::String => {
                        Ok(text.to_string())
                    }
                    (Some("text") | None, _) => {
                        Err(invalid("a text content part needs a string `text`"))
                    }
                    (Some(other), _) => Err(invalid(format!(
                        "content parts of type {other:?} are not supported"
                    ))),
                }
            })
            .collect(),
        _ => Err(invalid("content must be a string or a list of parts")),
    }
}

fn text_part(text: String) -> Value {
    Value::from_iter([("type", Value::from("text")), ("text", Value::from(text))])
}

/// `_postprocess_messages`: `None` when the list is empty (the key is dropped).
fn tool_calls(calls: Value) -> Result<Option<Value>, FrontendError> {
    if calls.kind() != ValueKind::Seq {
        return Ok(Some(calls));
    }
    let calls: Vec<Value> = calls.try_iter().into_iter().flatten().collect();
    if calls.is_empty() {
        return Ok(None);
    }
    let calls = calls
        .iter()
        .map(|call| {
            if call.kind() != ValueKind::Map {
                return Err(invalid("assistant tool_calls entries must be objects."));
            }
            let kind = field(call, "type").map(|t| t.to_string());
            let function = field(call, "function").filter(|f| f.kind() == ValueKind::Map);
            let (Some("function") | None, Some(function)) = (kind.as_deref(), function) else {
                return Err(invalid(
                    "chat completions only support assistant tool_calls of type 'function'.",
                ));
            };
            let arguments = arguments_mapping(field(&function, "arguments"));
            Ok(with_key(
                call,
                "function",
                with_key(&function, "arguments", arguments),
            ))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Value::from(calls)))
}

fn arguments_mapping(arguments: Option<Value>) -> Value {
    let empty = || Value::from_iter(std::iter::empty::<(Value, Value)>());
    let Some(arguments) = arguments.filter(Value::is_true) else {
        return empty();
    };
    let parsed = match arguments.kind() {
        ValueKind::String => {
            serde_json::from_str::<Value>(arguments.as_str().unwrap_or_default()).ok()
        }
        _ => Some(arguments),
    };
    parsed
        .filter(|p| p.kind() == ValueKind::Map)
        .unwrap_or_else(empty)
}

/// `map[key] = value` as Python does it: in place if present, else appended.
fn with_key(map: &Value, key: &str, value: Value) -> Value {
    let mut replaced = false;
    let mut fields: Vec<(Value, Value)> = map
        .try_iter()
        .into_iter()
        .flatten()
        .map(|k| {
            if k.as_str() == Some(key) {
                replaced = true;
                (k, value.clone())
            } else {
                let v = map.get_item(&k).unwrap_or_default();
                (k, v)
            }
        })
        .collect();
    if !replaced {
        fields.push((Value::from(key), value));
    }
    Value::from_iter(fields)
}

/// `_convert_developer_to_system` then `_consolidate_system_messages`.
fn developer_as_system(conversation: Vec<Value>) -> Vec<Value> {
    let conversation: Vec<Value> = conversation
        .into_iter()
        .map(|m| {
            if role(&m) != "developer" {
                return m;
            }
            let fields: Vec<(Value, Value)> = m
                .try_iter()
                .into_iter()
                .flatten()
                .filter(|k| k.as_str() != Some("tools"))
                .map(|k| {
                    let v = if k.as_str() == Some("role") {
                        Value::from("system")
                    } else {
                        m.get_item(&k).unwrap_or_default()
                    };
                    (k, v)
                })
                .collect();
            Value::from_iter(fields)
        })
        .collect();

    let mut system_texts = Vec::new();
    let mut others = Vec::new();
    let mut needs_merge = false;
    for (i, m) in conversation.iter().enumerate() {
        if role(m) != "system" {
            others.push(m.clone());
            continue;
        }
        needs_merge |= i > 0 || !system_texts.is_empty();
        let content = m.get_attr("content").unwrap_or_default();
        let text = match content.kind() {
            ValueKind::Seq => content
                .try_iter()
                .into_iter()
                .flatten()
                .filter_map(|p| match p.kind() {
                    ValueKind::String => Some(p.to_string()),
                    _ => field(&p, "text").map(|t| t.to_string()),
                })
                .collect::<Vec<_>>()
                .join("\n"),
            ValueKind::String => content.to_string(),
            _ => String::new(),
        };
        if !text.is_empty() {
            system_texts.push(text);
        }
    }
    if !needs_merge {
        return conversation;
    }
    let merged = Value::from_iter([
        ("role", Value::from("system")),
        ("content", Value::from(system_texts.join("\n\n"))),
    ]);
    std::iter::once(merged).chain(others).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(json: &str) -> Vec<Value> {
        serde_json::from_str(json).unwrap()
    }

    fn render(conversation: &[Value]) -> String {
        let mut out = String::new();
        for m in conversation {
            out.push_str(&serde_json::to_string(m).unwrap());
        }
        out
    }

    #[test]
    fn messages_keep_only_the_keys_vllm_passes_on() {
        let m = messages(
            r#"[{"role":"assistant","extra":1,"content":"done","reasoning":"hmm","name":"a"},
                {"role":"tool","content":[{"type":"text","text":"r1"},{"type":"text","text":"r2"}],"tool_call_id":"c1"}]"#,
        );
        let c = conversation(&m, ContentFormat::OpenAi, false).unwrap();
        assert_eq!(
            render(&c),
            r#"{"role":"assistant","content":[{"type":"text","text":"done"}],"reasoning":"hmm","reasoning_content":"hmm","name":"a"}{"role":"tool","content":"r1\nr2","tool_call_id":"c1"}"#
        );
    }

    #[test]
    fn tool_call_arguments_become_a_mapping() {
        let m = messages(
            r#"[{"role":"assistant","content":null,"tool_calls":[
                {"id":"1","type":"function","function":{"name":"f","arguments":"{\"z\": 1, \"a\": \"é\"}"}},
                {"id":"2","function":{"arguments":"not json","name":"g"}},
                {"id":"3","function":{"name":"h"}}]}]"#,
        );
        let c = conversation(&m, ContentFormat::String, false).unwrap();
        assert_eq!(
            render(&c),
            r#"{"role":"assistant","content":"","tool_calls":[{"id":"1","type":"function","function":{"name":"f","arguments":{"z":1,"a":"é"}}},{"id":"2","function":{"arguments":{},"name":"g"}},{"id":"3","function":{"name":"h","arguments":{}}}]}"#
        );
    }

    #[test]
    fn developer_messages_become_one_leading_system_message() {
        let m = messages(
            r#"[{"role":"user","content":"u"},{"role":"developer","content":"d"},{"role":"system","content":"s"}]"#,
        );
        let c = conversation(&m, ContentFormat::String, false).unwrap();
        assert_eq!(
            render(&c),
            r#"{"role":"system","content":"d\n\ns"}{"role":"user","content":"u"}"#
        );
        let kept = conversation(&m, ContentFormat::String, true).unwrap();
        assert_eq!(role(&kept[1]), "developer");
    }
}
