use crate::error::Result;
use crate::ops::xent::{
    Directional, DirectionalOutput, DirectionalSpec, Xent, XentOutput, XentSpec,
};

pub fn xent(_spec: &XentSpec, _call: &Xent<'_>) -> Result<XentOutput> {
    todo!()
}

pub fn directional(_spec: &DirectionalSpec, _call: &Directional<'_>) -> Result<DirectionalOutput> {
    todo!()
}
