//! Hostile templates never panic and never run away: random template text, loops and
//! repetition are stopped by the limits with an error.

use proptest::prelude::*;
use serde_json::json;
use spur_template::{TemplateEngine, json_context, render_parameters};

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn random_templates_never_panic(source in "(\\{\\{|\\}\\}|\\{%|%\\}|<< |>>|for x in range\\(9\\)|endfor|if |endif|event|\\.payload|\\||tojson|default\\('x'\\)|'|\"| |[a-z0-9])*") {
        let engine = TemplateEngine::new();
        let ctx = json_context(&json!({"event": {"payload": {"a": 1}}}));
        let _ = engine.validate(&source);
        let _ = engine.render(&source, &ctx);
        let _ = render_parameters(&engine, Some(&json!({"p": source})), &ctx);
    }
}

#[test]
fn runaway_templates_are_stopped_by_limits() {
    let engine = TemplateEngine::new();
    let ctx = json_context(&json!({}));
    for source in [
        "{% for a in range(100) %}{% for b in range(100) %}{% for c in range(100) %}x{% endfor %}{% endfor %}{% endfor %}",
        "{{ 'x' * 100000000 }}",
        "{% for a in range(100) %}{% for b in range(100) %}{{ 'y' * 1000 }}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    ] {
        assert!(engine.render(source, &ctx).is_err(), "{source} must fail");
    }
}
