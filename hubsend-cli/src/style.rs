//! What `--content-type` and `--property KEY=VALUE` set on every event `hubsend send` builds.

use hubsend::Event;

/// The content type and application properties given on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EventStyle {
    /// Replaces the default `application/json`.
    pub(crate) content_type: Option<String>,
    /// Added to every event as string-valued application properties, in order (a key given
    /// twice keeps its last value).
    pub(crate) properties: Vec<(String, String)>,
}

impl EventStyle {
    /// `event` with this style's content type and properties.
    pub(crate) fn apply(&self, mut event: Event) -> Event {
        if let Some(content_type) = &self.content_type {
            event = event.with_content_type(content_type.clone());
        }
        for (key, value) in &self.properties {
            event = event.with_property(key.clone(), value.clone());
        }
        event
    }
}

/// Parses `KEY=VALUE` (the value may hold `=`; the key may not be empty).
pub(crate) fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err("expected KEY=VALUE with a non-empty KEY".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_parse_at_the_first_equals_sign() {
        assert_eq!(
            parse_property("site=plant-7").unwrap(),
            ("site".into(), "plant-7".into())
        );
        assert_eq!(parse_property("q=a=b").unwrap(), ("q".into(), "a=b".into()));
        assert_eq!(
            parse_property("empty=").unwrap(),
            ("empty".into(), String::new())
        );
        assert!(parse_property("=v").is_err());
        assert!(parse_property("novalue").is_err());
    }

    #[test]
    fn the_style_sets_content_type_and_properties() {
        let style = EventStyle {
            content_type: Some("text/plain".into()),
            properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
        };
        let event = style.apply(Event::new("x").with_content_type("application/json"));
        assert_eq!(event.content_type(), Some("text/plain"));
        let props: Vec<_> = event
            .properties()
            .map(|(k, v)| (k.to_owned(), format!("{v:?}")))
            .collect();
        assert_eq!(props.len(), 1, "{props:?}");
        // The default style changes nothing.
        let plain =
            EventStyle::default().apply(Event::new("x").with_content_type("application/json"));
        assert_eq!(plain.content_type(), Some("application/json"));
        assert_eq!(plain.properties().count(), 0);
    }
}
