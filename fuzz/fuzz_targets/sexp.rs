//! The s-expression reader fed arbitrary text: it reads or refuses and never panics (nesting
//! is bounded, so no stack overflow); a datum it reads prints back to the same datum, unless
//! it holds a float out of range (the protocol has no infinities; they print as nil).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbmon_fuzz::wire::Sexp;

fn all_finite(s: &Sexp) -> bool {
    match s {
        Sexp::Float(x) => x.is_finite(),
        Sexp::List(items) => items.iter().all(all_finite),
        _ => true,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(value) = Sexp::parse(text)
        && all_finite(&value)
    {
        let printed = value.to_string();
        assert_eq!(Sexp::parse(&printed).as_ref(), Ok(&value), "{printed}");
    }
});
