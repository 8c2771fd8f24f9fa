//! A small JSON Schema validator for deployment parameters: `type`, `properties`, `required`,
//! `additionalProperties: false`, `enum`, `items`, `minimum`/`maximum`, `minLength`/`maxLength`.
//! Enough for Prefect's generated parameter schemas; unknown keywords are ignored.

use serde_json::Value;

/// Checks that a schema uses recognisable shapes (objects, a valid `type`).
pub fn check_schema(schema: &Value) -> Result<(), String> {
    let Value::Object(map) = schema else {
        return Err("a JSON Schema must be an object".into());
    };
    if let Some(t) = map.get("type") {
        let ok = |s: &str| {
            matches!(
                s,
                "object" | "array" | "string" | "integer" | "number" | "boolean" | "null"
            )
        };
        let valid = match t {
            Value::String(s) => ok(s),
            Value::Array(items) => items.iter().all(|i| i.as_str().is_some_and(ok)),
            _ => false,
        };
        if !valid {
            return Err(format!("unknown type {t}"));
        }
    }
    if let Some(Value::Object(props)) = map.get("properties") {
        for (name, sub) in props {
            check_schema(sub).map_err(|e| format!("properties.{name}: {e}"))?;
        }
    }
    Ok(())
}

fn type_matches(t: &str, value: &Value) -> bool {
    match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => {
            value.as_i64().is_some()
                || value.as_u64().is_some()
                || value.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => true,
    }
}

/// Validates parameters; the error names the offending parameter.
pub fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    check(schema, value, "")
}

fn at(path: &str) -> String {
    if path.is_empty() {
        "parameters".into()
    } else {
        format!("parameter {path:?}")
    }
}

fn check(schema: &Value, value: &Value, path: &str) -> Result<(), String> {
    let Value::Object(s) = schema else {
        return Ok(());
    };
    match s.get("type") {
        Some(Value::String(t)) if !type_matches(t, value) => {
            return Err(format!("{}: expected {t}, got {value}", at(path)));
        }
        Some(Value::Array(ts))
            if !ts
                .iter()
                .filter_map(Value::as_str)
                .any(|t| type_matches(t, value)) =>
        {
            return Err(format!(
                "{}: expected one of {}, got {value}",
                at(path),
                Value::Array(ts.clone())
            ));
        }
        _ => {}
    }
    if let Some(Value::Array(options)) = s.get("enum")
        && !options.contains(value)
    {
        return Err(format!(
            "{}: must be one of {}",
            at(path),
            Value::Array(options.clone())
        ));
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = s.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            return Err(format!("{}: must be at least {min}", at(path)));
        }
        if let Some(max) = s.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            return Err(format!("{}: must be at most {max}", at(path)));
        }
    }
    if let Some(text) = value.as_str() {
        let len = text.chars().count() as u64;
        if let Some(min) = s.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            return Err(format!("{}: must be at least {min} characters", at(path)));
        }
        if let Some(max) = s.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            return Err(format!("{}: must be at most {max} characters", at(path)));
        }
    }
    if let Value::Object(obj) = value {
        if let Some(Value::Array(required)) = s.get("required") {
            for r in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    let child = if path.is_empty() {
                        r.to_owned()
                    } else {
                        format!("{path}.{r}")
                    };
                    return Err(format!("{}: is required", at(&child)));
                }
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, v) in obj {
            let child = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            match props.and_then(|p| p.get(k)) {
                Some(sub) => check(sub, v, &child)?,
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{}: is not an accepted parameter", at(&child)));
                }
                None => {}
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, s.get("items")) {
        for (i, item) in items.iter().enumerate() {
            check(item_schema, item, &format!("{path}[{i}]"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_and_names_the_parameter() {
        let schema = json!({"type": "object", "required": ["n"], "additionalProperties": false,
                            "properties": {"n": {"type": "integer", "minimum": 1}, "mode": {"enum": ["a", "b"]}}});
        assert!(validate(&schema, &json!({"n": 3, "mode": "a"})).is_ok());
        assert_eq!(
            validate(&schema, &json!({"n": "3"})),
            Err("parameter \"n\": expected integer, got \"3\"".into())
        );
        assert_eq!(
            validate(&schema, &json!({})),
            Err("parameter \"n\": is required".into())
        );
        assert!(
            validate(&schema, &json!({"n": 1, "x": 1}))
                .unwrap_err()
                .contains("\"x\"")
        );
        assert!(
            validate(&schema, &json!({"n": 0}))
                .unwrap_err()
                .contains("at least 1")
        );
        assert!(check_schema(&json!({"type": "wat"})).is_err());
    }
}
