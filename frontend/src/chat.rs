//! The prompt text of a chat completion: the model's chat template rendered over the request's
//! messages, as vLLM renders it (through transformers' `apply_chat_template`), with minijinja
//! standing in for Jinja2.
//!
//! What a template sees is what transformers gives it: `messages`, `add_generation_prompt`,
//! `tools` when the request has some, the named special tokens (`bos_token`, `eos_token`,
//! `unk_token`, `pad_token`), the request's `chat_template_kwargs`; `raise_exception(msg)` and
//! a `tojson` that writes like Python's `json.dumps` (`", "` and `": "`, non-ASCII kept).
//! Blocks are trimmed as HF trims them (`trim_blocks`, `lstrip_blocks`), and Python's string
//! methods (`.strip()`, `.startswith()`, ...) work through minijinja-contrib's pycompat.
//!
//! Message content follows vLLM's two formats. A template that loops over a message's content
//! gets the OpenAI form, a list of parts (a string content becomes one `{type: text}` part);
//! any other template gets a string, the text parts joined with newlines. The rest of what
//! vLLM does to messages before rendering lives in `conversation.rs`.
//!
//! The rendered text already holds the BOS the template writes, so it is tokenized without
//! special tokens.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

use crate::conversation::conversation;
use crate::{FrontendError, Tokenizer};

/// How message content reaches the template (vLLM's `ChatTemplateContentFormat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentFormat {
    String,
    OpenAi,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    content_format: ContentFormat,
    /// vLLM's test: the template source names the role `"developer"` or `'developer'`.
    template_knows_developer: bool,
    special_tokens: Vec<(&'static str, String)>,
}

const TEMPLATE: &str = "chat";

impl ChatTemplate {
    /// The template the model ships (see [`Tokenizer::chat_template_source`]).
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Self, FrontendError> {
        let source = tokenizer.chat_template_source()?.ok_or_else(|| {
            FrontendError::NoChatTemplate(format!(
                "{} has neither chat_template.jinja nor chat_template in tokenizer_config.json",
                tokenizer.dir().display()
            ))
        })?;
        Self::new(source, tokenizer)
    }

    /// A template given as source (`--chat-template`), for the tokenizer's special tokens.
    pub fn new(source: String, tokenizer: &Tokenizer) -> Result<Self, FrontendError> {
        let content_format = detect_content_format(&source);
        let template_knows_developer =
            source.contains("\"developer\"") || source.contains("'developer'");
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE, source)
            .map_err(|e| FrontendError::ChatTemplate(e.to_string()))?;
        let special_tokens = [
            ("bos_token", tokenizer.bos()),
            ("eos_token", tokenizer.eos()),
            ("unk_token", tokenizer.unk()),
            ("pad_token", tokenizer.pad()),
        ]
        .into_iter()
        .filter_map(|(name, token)| Some((name, token?.text.clone())))
        .collect();
        Ok(Self {
            env,
            content_format,
            template_knows_developer,
            special_tokens,
        })
    }

    pub fn content_format(&self) -> ContentFormat {
        self.content_format
    }

    /// Renders `messages_json` (the request's `messages` array, as JSON text so that key order
    /// survives into `tojson`). `tools_json` and `kwargs_json` are the request's `tools` and
    /// `chat_template_kwargs`, if any.
    pub fn render(
        &self,
        messages_json: &str,
        add_generation_prompt: bool,
        tools_json: Option<&str>,
        kwargs_json: Option<&str>,
    ) -> Result<String, FrontendError> {
        let messages: Vec<Value> = serde_json::from_str(messages_json)
            .map_err(|e| FrontendError::InvalidMessage(e.to_string()))?;
        let messages = conversation(
            &messages,
            self.content_format,
            self.template_knows_developer,
        )?;

        let mut context: Vec<(String, Value)> = Vec::new();
        if let Some(kwargs) = kwargs_json {
            let kwargs: Value = serde_json::from_str(kwargs)
                .map_err(|e| FrontendError::InvalidMessage(format!("chat_template_kwargs: {e}")))?;
            for key in kwargs.try_iter().into_iter().flatten() {
                let value = kwargs.get_item(&key).unwrap_or_default();
                context.push((key.to_string(), value));
            }
        }
        for (name, text) in &self.special_tokens {
            context.push((name.to_string(), Value::from(text.as_str())));
        }
        if let Some(tools) = tools_json {
            let tools: Value = serde_json::from_str(tools)
                .map_err(|e| FrontendError::InvalidMessage(format!("tools: {e}")))?;
            context.push(("tools".into(), tools));
        }
        context.push(("messages".into(), Value::from(messages)));
        context.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));

        let template = self.env.get_template(TEMPLATE).expect("added in new");
        template
            .render(Value::from_iter(context))
            .map_err(|e| FrontendError::ChatTemplate(render_error(&e)))
    }
}

/// vLLM parses the template and looks for a loop over a message's content; this looks for the
/// same loop in the source: `for x in message['content']`, `message.content`, or `content`.
fn detect_content_format(source: &str) -> ContentFormat {
    let mut rest = source;
    while let Some(at) = rest.find("for ") {
        rest = &rest[at + 4..];
        let Some(in_at) = rest.find(" in ") else {
            break;
        };
        let iterable: String = rest[in_at + 4..]
            .trim_start()
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '%' && *c != '|' && *c != '-')
            .collect();
        let iterable = iterable.trim_end_matches([']', '\'', '"', ')']);
        if iterable == "content"
            || iterable.ends_with(".content")
            || iterable.ends_with("['content")
            || iterable.ends_with("[\"content")
        {
            return ContentFormat::OpenAi;
        }
    }
    ContentFormat::String
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn render_error(e: &Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        _ => e.to_string(),
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=..., separators=...,
/// sort_keys=...)`, which unlike Jinja's does not escape HTML characters.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let dumper = PyJson {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    dumper.write(&mut out, value, 0)?;
    Ok(Value::from_safe_string(out))
}

struct PyJson {
    indent: Option<usize>,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

impl PyJson {
    fn write(&self, out: &mut String, value: &Value, depth: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => match f64::try_from(value.clone()) {
                Ok(f) if value.as_i64().is_none() => out.push_str(&python_float(f)),
                _ => out.push_str(&value.to_string()),
            },
            ValueKind::String => out.push_str(
                &serde_json::to_string(value.as_str().unwrap_or_default()).unwrap_or_default(),
            ),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(out, '[', ']', depth, items.len(), |out, i| {
                    self.write(out, &items[i], depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.write_container(out, '{', '}', depth, keys.len(), |out, i| {
                    let key = keys[i].to_string();
                    out.push_str(&serde_json::to_string(&key).unwrap_or_default());
                    out.push_str(&self.key_sep);
                    self.write(out, &value.get_item(&keys[i])?, depth + 1)
                })?;
            }
            _ => out.push_str(&serde_json::to_string(&value.to_string()).unwrap_or_default()),
        }
        Ok(())
    }

    fn write_container(
        &self,
        out: &mut String,
        open: char,
        close: char,
        depth: usize,
        len: usize,
        mut item: impl FnMut(&mut String, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(indent) = self.indent {
                out.push('\n');
                out.push_str(&" ".repeat(indent * (depth + 1)));
            }
            item(out, i)?;
        }
        if let Some(indent) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(indent * depth));
        }
        out.push(close);
        Ok(())
    }
}

/// Python's `repr(float)` for the floats JSON carries: integral values keep a `.0`.
fn python_float(f: f64) -> String {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_llama() -> Tokenizer {
        Tokenizer::from_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/tiny-llama")).unwrap()
    }

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(source.to_string(), &tiny_llama()).unwrap()
    }

    #[test]
    fn the_tiny_llama_template_renders_a_multi_turn_chat() {
        let t = tiny_llama();
        let chat = ChatTemplate::from_tokenizer(&t).unwrap();
        assert_eq!(chat.content_format(), ContentFormat::String);
        let messages = r#"[{"role":"system","content":"Be brief."},
            {"role":"user","content":"Hi"},
            {"role":"assistant","content":"Hello!"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]"#;
        let prompt = chat.render(messages, true, None, None).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn special_tokens_and_trimmed_blocks() {
        let chat = template("{{ bos_token }}\n{% for m in messages %}\n  {{ m.content.strip() }}{{ eos_token }}\n{% endfor %}\n");
        let out = chat
            .render(r#"[{"role":"user","content":"  x  "}]"#, false, None, None)
            .unwrap();
        // As Jinja2: lstrip_blocks strips before `{%` only, so the indent before `{{` stays.
        assert_eq!(out, "<s>\n  x</s>\n");
    }

    #[test]
    fn raise_exception_fails_the_render_with_its_message() {
        let chat = template("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}");
        let err = chat
            .render(r#"[{"role":"system","content":"x"}]"#, false, None, None)
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn tojson_writes_like_python_json_dumps() {
        let chat = template("{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}");
        let out = chat
            .render(
                "[]",
                false,
                Some(r#"[{"name":"f","z":1,"a":[true,null,1.0,"<é>"]}]"#),
                None,
            )
            .unwrap();
        assert_eq!(
            out,
            "[{\"name\": \"f\", \"z\": 1, \"a\": [true, null, 1.0, \"<é>\"]}]|{\n  \"name\": \"f\",\n  \"z\": 1,\n  \"a\": [\n    true,\n    null,\n    1.0,\n    \"<é>\"\n  ]\n}"
        );
    }

    #[test]
    fn a_template_looping_over_content_gets_openai_parts() {
        let chat = template("{% for m in messages %}{% for p in m['content'] %}[{{ p.type }}:{{ p.text }}]{% endfor %}{% endfor %}");
        assert_eq!(chat.content_format(), ContentFormat::OpenAi);
        let out = chat
            .render(r#"[{"role":"user","content":"s"},{"role":"user","content":[{"type":"text","text":"t"}]}]"#, false, None, None)
            .unwrap();
        assert_eq!(out, "[text:s][text:t]");
    }

    #[test]
    fn chat_template_kwargs_reach_the_template() {
        let chat = template("{{ enable_thinking }}");
        let out = chat
            .render("[]", false, None, Some(r#"{"enable_thinking":false}"#))
            .unwrap();
        // Python prints booleans capitalised, and so does minijinja with pycompat.
        assert_eq!(out, "False");
    }

    #[test]
    fn image_parts_are_refused() {
        let chat = ChatTemplate::from_tokenizer(&tiny_llama()).unwrap();
        let messages =
            r#"[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]"#;
        assert!(chat.render(messages, true, None, None).is_err());
    }
}
